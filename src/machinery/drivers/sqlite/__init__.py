"""The embedded default (`sqlite:///PATH`): broker, result backend and lock in one SQLite file,
shared safely by the processes of one machine.
"""
