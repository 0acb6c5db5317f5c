"""machinery: a distributed task queue for Python, wire-compatible with Go Machinery."""
