"""The rank-selection methods and what each one's parameter must be (no torch: the config and
the CLI check parameters without loading the math)."""

from __future__ import annotations

from lorad.errors import ReduceError

METHODS = ("rank", "fro", "ratio", "cumulative", "budget", "project")


def validate(method: str, param: float | None, budget_mb: float | None = None) -> None:
    """Refuse a parameter the method cannot mean, with one line that says what it must be."""
    if method not in METHODS:
        raise ReduceError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "budget":
        if budget_mb is None and param is None:
            raise ReduceError("method budget needs a size target in MiB (--budget-mb, or budget_mb in a policy)")
        target = budget_mb if budget_mb is not None else param
        if not target > 0:
            raise ReduceError(f"a budget must be a size in MiB above 0, got {target}")
        return
    if param is None:
        raise ReduceError(f"method {method} needs a param")
    if method in ("rank", "project") and (param < 1 or param != int(param)):
        raise ReduceError(f"method {method} takes a whole rank >= 1 as param, got {param}")
    if method in ("fro", "cumulative") and not 0 < param <= 1:
        raise ReduceError(f"method {method} takes a param in (0, 1], got {param}")
    if method == "ratio" and not param >= 1:
        raise ReduceError(f"method ratio takes a param >= 1 (largest / smallest kept value), got {param}")
