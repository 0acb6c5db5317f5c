"""Runs README code blocks as one script, the way a user runs the file they pasted them into.

Usage: python readme_runner.py BLOCKS.json  (a list of [first README line, source]; run in the
directory that holds the app module). Blocks share one namespace, in order. A top-level expression
whose line ends in a comment `# -> TEXT` must have a repr matching TEXT, where `...` stands for
anything (TEXT ends at two spaces: what follows explains). Errors point at README.md lines.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import sys
import tokenize
from typing import Any


def check(value: Any, expected: str, line: int) -> None:
    got = repr(value)
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    if not re.fullmatch(pattern, got, re.DOTALL):
        raise AssertionError(f"README.md line {line}: the code gives {got}, the README says {expected}")


def claims(source: str) -> dict[int, str]:
    """Block line -> the TEXT of a `# -> TEXT` comment on it."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith("# -> "):
            out[tok.start[0]] = tok.string[len("# -> "):].split("  ")[0].strip()
    return out


def compile_block(first_line: int, source: str) -> Any:
    tree = ast.parse(source)
    found = claims(source)
    used = set()
    for i, stmt in enumerate(tree.body):
        end = stmt.end_lineno or stmt.lineno
        if end in found and isinstance(stmt, ast.Expr):
            used.add(end)
            call = ast.Call(ast.Name("__readme_check__", ast.Load()),
                            [stmt.value, ast.Constant(found[end]), ast.Constant(first_line + end - 1)], [])
            tree.body[i] = ast.copy_location(ast.Expr(call), stmt)
    unused = sorted(set(found) - used)
    if unused:
        raise AssertionError(f"README.md line {first_line + unused[0] - 1}: a `# ->` claim on a line that "
                             "is not a whole expression statement, so it cannot be checked")
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, first_line - 1)
    return compile(tree, "README.md", "exec")


def main(path: str) -> None:
    sys.path.insert(0, os.getcwd())  # as when running a script that sits next to the app module
    with open(path) as f:
        blocks = json.load(f)
    namespace: dict[str, Any] = {"__name__": "__main__", "__readme_check__": check}
    for first_line, source in blocks:
        exec(compile_block(first_line, source), namespace)


if __name__ == "__main__":
    main(sys.argv[1])
