"""Drivers: one package per technology, each implementing the contracts beside this file.

`broker.py`, `backend.py` and `lock.py` define the primitives a driver implements; `registry.py`
maps URL schemes to driver classes and imports a driver only when its scheme is used, so
`import machinery` loads no client library.
"""
