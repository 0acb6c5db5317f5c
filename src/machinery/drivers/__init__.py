"""Drivers: one package per technology, each implementing the contracts beside this file.

`broker.py`, `backend.py` and `lock.py` define the primitives a driver implements;
`capabilities.py` the optional features a driver may declare, each with one interface the core
uses; `registry.py` maps URL schemes to driver classes and imports a driver only when its scheme
is used, so `import machinery` loads no client library. A package whose broker and backend can
work together on one server (Redis) says so in its `pairing.py` (see capabilities.Pairing).
"""
