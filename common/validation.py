"""Config validation helpers shared by every config dataclass: errors name the field and what is allowed."""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (dotted path) and the allowed values."""


def check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{field}: {value!r} is not one of {allowed}")


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0
