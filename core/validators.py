"""attrs validators and converters with mixgrpo's error messages, for components written as attrs classes.

The built-in schedules and objectives are ``attrs`` classes whose arguments are checked by these;
a plugin may use them too. Every check raises ``ValueError`` naming the argument, what is valid and
the value it got, e.g. ``window_size must be an integer >= 1, got 0``. attrs runs converters before
validators, and the validators of all fields after every field is set, so a validator may compare
its field with another (``not_above``). ``check_objective_factory`` checks a registered objective
factory's constructor the same way (re-exported by ``core/interfaces.py``, whose contract it checks).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import attrs

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def as_integer(value: Any) -> Any:
    """Converter: a whole number (``4`` or ``4.0``) becomes ``int``; anything else (``4.5``,
    ``True``, a string) is left for ``integer`` to reject with its message."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and int(value) == value:
        return int(value)
    return value


def optional_int(value: Any) -> Any:
    """Converter of an optional integer setting: None (its default) stays None, anything else goes
    through ``as_integer`` and is left for the field's validator to check."""
    return None if value is None else as_integer(value)


def integer(minimum: int) -> Validator:
    """An ``int`` (not a bool) >= ``minimum``."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{attribute.name} must be an integer >= {minimum}, got {value!r}")

    return check


def as_int_tuple(value: Any) -> tuple[int, ...]:
    """Converter: one number or a sequence of them → a tuple, whole numbers as ``int`` (``as_integer``)."""
    values = (value,) if isinstance(value, int | float) else tuple(value)
    return tuple(as_integer(v) for v in values)


def increasing_integers(minimum: int, empty: bool) -> Validator:
    """A tuple of strictly increasing integers >= ``minimum`` (may be empty when ``empty``)."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: tuple[int, ...]) -> None:
        if (not value and not empty) or list(value) != sorted(set(value)) or any(v < minimum for v in value):
            raise ValueError(f"{attribute.name} must be {'' if empty else 'non-empty, '}increasing integers >= "
                             f"{minimum}, got {value}")

    return check


def in_unit_interval(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    """A number in [0, 1] (NaN is not)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


def positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    """A number > 0 (NaN is not)."""
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    """A number >= 0 (NaN is not; infinity is)."""
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def finite_non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    """A finite number >= 0."""
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value}")


def one_of(what: str, choices: Sequence[str]) -> Validator:
    """One of ``choices``; the message reads ``unknown <what> 'x'; valid: a, b``."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")

    return check


def not_above(other: str) -> Validator:
    """At most the value of the field ``other`` of the same instance."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        bound = getattr(instance, other)
        if value > bound:
            raise ValueError(f"{attribute.name}={value} must be <= {other}={bound}")

    return check


def check_objective_factory(factory: Callable[..., Any], name: str | None = None) -> None:
    """Refuse an objective factory (the class or function a plugin registers as ``name``) that breaks
    ``Objective``'s constructor contract, which says it takes the keyword argument ``weights`` (or
    ``**kwargs``): a ValueError names the factory, the contract and the fix."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): the call itself will tell
        return
    if any(p.kind is p.VAR_KEYWORD or (p.name == "weights" and p.kind is not p.POSITIONAL_ONLY) for p in params):
        return
    label = getattr(factory, "__qualname__", repr(factory))
    raise ValueError(
        f"{f'objective {name!r} ({label})' if name else label} breaks the objectives' constructor contract "
        "(Objective): it must take the keyword argument weights (a dict {reward name: weight}, or None for equal "
        "weights), with which the trainer builds every objective (weights=dict(TrainConfig.rewards)); add "
        "`weights: Mapping[str, float] | None = None` to its constructor, keep it as self.weights and combine "
        "the rewards in advantages() with it"
    )


__all__ = ["as_integer", "check_objective_factory", "finite_non_negative", "in_unit_interval", "integer",
           "non_negative", "not_above", "one_of", "optional_int", "positive"]
