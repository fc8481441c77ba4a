"""Type and range checks for values that come from outside (Python arguments, HTTP bodies,
magic options), with one wording for every message: the field, what is allowed, the value.

Python's duck typing lets ``True`` pass as ``1``, ``2.0`` as an index, ``float("nan")``
through every comparison (they are all False) and a lone surrogate into a tokenizer that then
raises ``TypeError``. Each of those reached the model step once and took a whole batch down, so
every public entry point checks here first and raises ``ValueError`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The type and bounds of one numeric field (what ``check`` enforces and the HTTP schema
    declares). ``kind`` is ``int`` (bool excluded) or ``float`` (int accepted, finite only)."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    optional: bool = False  # None is allowed
    hint: str = ""

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        bounds = [
            f"{op} {_num(bound)}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le))
            if bound is not None
        ]
        text = " ".join([what, " and ".join(bounds)]).strip()
        if self.optional:
            text += " or None"
        return text + (f" ({self.hint})" if self.hint else "")

    def check(self, name: str, value) -> None:
        if value is None and self.optional:
            return
        ok = is_int(value) if self.kind is int else is_number(value)
        if ok:
            ok = (
                (self.ge is None or value >= self.ge)
                and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le)
            )
        if not ok:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**64 else str(x)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a finite float (not a bool, not NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_text(name: str, value, allow_empty: bool = True) -> None:
    """A ``str`` that is valid Unicode text (UTF-8 encodable: no lone surrogates)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__} {_short(value)}")
    if not allow_empty and not value:
        raise ValueError(f"{name} must be a non-empty string, got ''")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} is not valid text: it holds a lone surrogate {value[e.start : e.end]!r} at "
            f"character {e.start}"
        ) from None


def check_token_ids(name: str, value, allow_empty: bool = True) -> list[int]:
    """A list (or tuple) of non-negative integer token ids; returns it as a list."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {type(value).__name__}")
    for i, t in enumerate(value):
        if not is_int(t) or t < 0:
            raise ValueError(f"{name}[{i}] must be a token id (an integer >= 0), got {_short(t)}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must hold at least one token id, got []")
    return list(value)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
