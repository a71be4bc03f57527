"""The one error constructor for bad arguments: "name: expected ..., got ...".

    raise fail("window", "a positive int", -1)   # ValueError("window: expected a positive int, got -1")

`fail(..., cls=TypeError)` for a wrong type. The CLI turns these into exit status 2.
"""

from __future__ import annotations


def fail(name: str, expected: str, got, *, cls: type[Exception] = ValueError) -> Exception:
    """An exception (ValueError unless `cls`) whose message names the argument, what was
    expected and what was given (its repr, cut to 200 characters)."""
    text = repr(got)
    if len(text) > 200:
        text = text[:197] + "..."
    return cls(f"{name}: expected {expected}, got {text}")
