"""Secrets for node executors: where their values come from, and how to keep them out of text."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

# Also a safe file name: no separators, no leading dot, so a name can never leave the directory.
SECRET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
REDACTED = "***"


class SecretNotFound(LookupError):
    """A secret a node asked for does not exist. The message names the secret, never a value."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"secret {name!r} is not defined: {where}")
        self.name = name


class SecretStore(Protocol):
    def get(self, name: str) -> str:
        """The value of secret `name`; raises `SecretNotFound` if there is none."""
        ...


class EnvironmentSecrets:
    """Secrets from environment variables: secret `NAME` is the variable `{prefix}NAME`."""

    def __init__(self, prefix: str = "CITADEL_SECRET_", environ: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self._environ = os.environ if environ is None else environ

    def get(self, name: str) -> str:
        _check_name(name)
        value = self._environ.get(self.prefix + name)
        if value is None:
            raise SecretNotFound(name, f"set the environment variable {self.prefix}{name} for the engine")
        return value


class FileSecrets:
    """Secrets from files: secret `NAME` is the content of `directory/NAME`, less its trailing newline.

    This is the layout of Kubernetes and Docker secret mounts.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def get(self, name: str) -> str:
        _check_name(name)
        path = self.directory / name
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise SecretNotFound(name, f"there is no file {path}") from None


def _check_name(name: str) -> None:
    if not SECRET_NAME.match(name):
        raise SecretNotFound(
            name, "a secret name is 1 to 128 letters, digits, '_', '.' or '-', not starting with '.'"
        )


def redact(text: str, values: Iterable[str]) -> str:
    """`text` with every occurrence of each value, and of its JSON, URL and repr escapes, as ***."""
    forms = {form for value in values if value for form in _written_forms(value)}
    # Longest first, so a value that contains another is not left half-replaced.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, REDACTED)
    return text


def _written_forms(value: str) -> set[str]:
    """The ways a value commonly appears once a server or library has echoed it back."""
    return {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        quote(value),
        repr(value)[1:-1],
        repr(value.encode("utf-8"))[2:-1],
    } - {""}
