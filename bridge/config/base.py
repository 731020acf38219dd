"""What every configuration section shares, and which keys are secret."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


class Section(BaseModel):
    # A misspelt key must be an error, not a silently ignored line.
    model_config = ConfigDict(extra="forbid", frozen=True)


def readable_file(value: str) -> str:
    if value and not Path(value).is_file():
        raise ValueError(f"{value!r} is not a readable file")
    return value


def writable_directory(value: str) -> str:
    if value:
        path = Path(value)
        if not path.is_dir():
            raise ValueError(f"{value!r} is not a directory")
        import os

        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{value!r} is not writable by this process")
    return value
