"""Kernel switches read from the environment at call time (tests and A/B scripts flip them)."""
from __future__ import annotations

import os


def env_flag(name: str, default: bool) -> bool:
    """The switch `name`: "1" on, "0" off, unset -> default; any other value is a ValueError."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def env_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """The setting `name`, one of `choices` (unset -> default); any other value is a ValueError."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
