"""Checked by tests/test_typing.py with mypy --strict, not run: on each line, a `# N:` comment is
the note mypy must print there (reveal_type) and a `# E:` comment the error; nothing else may be
reported. The expected messages must sit on their lines, hence the long lines."""
# ruff: noqa: E501

from __future__ import annotations

from datetime import timedelta
from typing import Any, reveal_type

from machinery import Chain, Server, Signature, TaskContext

server = Server()


@server.task
def add(x: int, y: int) -> int:
    return x + y


@server.task
async def aadd(x: int, y: int = 0) -> int:
    return x + y


@server.task(name="mul", retry_count=3)
async def multiply(*args: int) -> int:
    out = 1
    for a in args:
        out *= a
    return out


@server.task
def resize(ctx: TaskContext, url: str) -> str:
    return url


@server.task
async def aresize(ctx: TaskContext, url: str, width: int) -> tuple[str, int]:
    return url, width


@server.task
def nothing() -> None:
    return None


@server.task
def describe(value: object, width: int) -> str:  # `object` would take a TaskContext too: still an argument
    return str(value)[:width]


@server.task
def loose(value: Any, width: int) -> str:  # Any makes the kind ambiguous: mypy gives up (Any), no false error
    return str(value)[:width]


reveal_type(add)  # N: Revealed type is "machinery.task.FunctionTask[[x: int, y: int], int]"
reveal_type(aadd)  # N: Revealed type is "machinery.task.CoroutineTask[[x: int, y: int =], int]"
reveal_type(multiply)  # N: Revealed type is "machinery.task.CoroutineTask[[*args: int], int]"
reveal_type(resize)  # N: Revealed type is "machinery.task.ContextTask[[url: str], str]"
reveal_type(describe)  # N: Revealed type is "machinery.task.FunctionTask[[object, width: int], str]"
reveal_type(loose)  # N: Revealed type is "Any"
reveal_type(aresize)  # N: Revealed type is "machinery.task.CoroutineContextTask[[url: str, width: int], tuple[str, int]]"

res = add.send(1, 2)
reveal_type(res)  # N: Revealed type is "machinery.result.AsyncResult[int]"
reveal_type(res.get(timeout=5))  # N: Revealed type is "int"
reveal_type(add.send(1, y=2).get())  # N: Revealed type is "int"
reveal_type(aadd.send(1).get())  # N: Revealed type is "int"
reveal_type(multiply.send(1, 2, 3).get())  # N: Revealed type is "int"
reveal_type(resize.send("a.png").get())  # N: Revealed type is "str"
reveal_type(aresize.send("a.png", 3).get())  # N: Revealed type is "tuple[str, int]"
reveal_type(nothing.send().get())  # N: Revealed type is "None"
reveal_type(server.send_task(Signature("add", [1, 2])).get())  # N: Revealed type is "Any"
reveal_type(add.with_options(countdown=3).send(1, 2).get())  # N: Revealed type is "int"
reveal_type(add.s(1, 2))  # N: Revealed type is "machinery.tasks.signature.Signature"
reveal_type(server.send_chain(Chain(add.s(1, 2), add.partial(3))).get())  # N: Revealed type is "Any"
reveal_type(add(1, 2))  # N: Revealed type is "int"
reveal_type(resize(TaskContext(Signature("resize")), "a.png"))  # N: Revealed type is "str"
reveal_type(describe.send(3.5, 2).get())  # N: Revealed type is "str"
loose.send(1, 2)

add.send(1, "2")  # E: Argument 2 to "send" of "Task" has incompatible type "str"; expected "int"  [arg-type]
add.send(1)  # E: Missing positional argument "y" in call to "send" of "Task"  [call-arg]
add.send(1, 2, 3)  # E: Too many arguments for "send" of "Task"  [call-arg]
add.send(1, z=2)  # E: Unexpected keyword argument "z" for "send" of "Task"  [call-arg]
add.send(1, 2, eta=timedelta(seconds=2))  # E: Unexpected keyword argument "eta" for "send" of "Task"  [call-arg]
add.s(1, "2")  # E: Argument 2 has incompatible type "str"; expected "int"  [arg-type]
multiply.send(1, "2")  # E: Argument 2 to "send" of "Task" has incompatible type "str"; expected "int"  [arg-type]
resize.send(TaskContext(Signature("resize")), "a.png")  # E: Too many arguments for "send" of "Task"  [call-arg]  # E: Argument 1 to "send" of "Task" has incompatible type "TaskContext"; expected "str"  [arg-type]
describe.send(3.5, "2")  # E: Argument 2 to "send" of "Task" has incompatible type "str"; expected "int"  [arg-type]
resize.send(3)  # E: Argument 1 to "send" of "Task" has incompatible type "int"; expected "str"  [arg-type]
add.with_options(retry_cout=3)  # E: Unexpected keyword argument "retry_cout" for "with_options" of "Task"; did you mean "retry_count" or "retry_timeout"?  [call-arg]
add.with_options(countdown="3")  # E: Argument "countdown" to "with_options" of "Task" has incompatible type "str"; expected "float"  [arg-type]
add.with_options(eta=3).send(1, 2)  # E: Argument "eta" to "with_options" of "Task" has incompatible type "int"; expected "datetime | timedelta"  [arg-type]
add.with_options(countdown=3).send(1)  # E: Missing positional argument "y" in call to "send" of "Task"  [call-arg]
got: str = add.send(1, 2).get()  # E: Incompatible types in assignment (expression has type "int", variable has type "str")  [assignment]


@server.task(retry_cout=3)  # E: Unexpected keyword argument "retry_cout" for overloaded function "task" of "Server"; did you mean "retry_count" or "retry_timeout"?  [call-overload]  # E: Untyped decorator makes function "misspelt" untyped  [untyped-decorator]
def misspelt() -> None:
    return None


async def awaited() -> None:
    reveal_type(await (await add.asend(1, 2)).aget(timeout=5))  # N: Revealed type is "int"
    reveal_type(await aadd(1, 2))  # N: Revealed type is "int"
    await aresize.asend("a.png", "wide")  # E: Argument 2 to "asend" of "Task" has incompatible type "str"; expected "int"  [arg-type]
