"""Go Machinery's retry back-off: the next Fibonacci number above the last delay (1, 2, 3, 5, 8 ... s)."""

from __future__ import annotations


def fibonacci_next(n: int) -> int:
    """The first Fibonacci number greater than n (0->1, 1->2, 3->5, 4->5, 5->8)."""
    a, b = 1, 1
    while a <= n:
        a, b = b, a + b
    return a
