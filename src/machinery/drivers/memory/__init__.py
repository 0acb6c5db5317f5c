"""In-process drivers (`memory://`, `eager`, `null`): broker, backend and lock in one process, for
unit tests and users' own tests.
"""
