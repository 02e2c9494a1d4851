"""Shared pieces of the configuration classes: the error type and the flag-field helper."""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """An invalid run configuration, reported as one clear line before anything starts."""


def flag_field(default: Any = None, help: str | None = None, **meta: Any) -> Any:  # noqa: A002
    """A dataclass field with its default and command-line metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def bf16_dtype(flag: bool) -> str:
    """``--bf16`` → the ``params_dtype`` value."""
    return "bf16" if flag else "fp32"


def negate(flag: bool) -> bool:
    """A ``--no-…`` switch → the positive field value."""
    return not flag
