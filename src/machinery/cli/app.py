"""`--app MODULE:ATTR`: find the user's Server without running anything it was not meant to run.

ATTR must be a Server. A factory is called only when asked for explicitly (`MODULE:ATTR()` or
`--factory`): calling whatever callable ATTR names would run a task function, or a class, by
mistake.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from machinery.errors import MachineryError

if TYPE_CHECKING:
    from machinery.server import Server

_FORM = "MODULE:ATTR (e.g. myapp.tasks:server), or MODULE:FACTORY() for a function that returns a Server"


def load_app(spec: str, factory: bool = False) -> Server:
    """Import MODULE and return its Server ATTR (dots allowed), or what the factory ATTR returns
    when `spec` ends in "()" or `factory` is set."""
    from machinery.server import Server

    module_name, sep, attr = spec.partition(":")
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    if not sep or not module_name or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise MachineryError(f"--app must look like {_FORM}; got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MachineryError(f"--app {spec}: cannot import {module_name}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise MachineryError(f"--app {spec}: module {module_name} has no attribute {attr!r}") from None
    if call or factory:
        if isinstance(obj, Server):
            raise MachineryError(f"--app {spec}: {attr} is already a Server; drop the factory call")
        if not callable(obj):
            raise MachineryError(f"--app {spec}: {attr} is {_kind(obj)}, not a function that returns a Server")
        made = obj()
        if not isinstance(made, Server):
            raise MachineryError(f"--app {spec}: the factory {attr}() returned {_kind(made)}, not a machinery.Server")
        return made
    if not isinstance(obj, Server):
        hint = ""
        if callable(obj):
            hint = (f"; if {attr} is a function that returns the Server, say so: --app {module_name}:{attr}() "
                    "or --factory")
        raise MachineryError(f"--app {spec}: {attr} is {_kind(obj)}, not a machinery.Server{hint}")
    return obj


def _kind(obj: object) -> str:
    """A short description of what was found instead of a Server."""
    from machinery.task import Task

    if isinstance(obj, Task):
        return f"the task {obj.name!r}"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    if callable(obj):
        name = getattr(obj, "__qualname__", type(obj).__name__)
        return f"the function {name}" if hasattr(obj, "__code__") else f"a callable {type(obj).__name__}"
    return f"a value of type {type(obj).__name__}"
