"""Readable validation errors: one line per problem, each naming its field path."""
from __future__ import annotations

from pydantic import ValidationError


class RetailbusError(Exception):
    """The root of every exception retailbus raises on purpose: `except RetailbusError`
    catches ours and lets a programming error (TypeError, KeyError ...) through."""


class ContractError(RetailbusError, ValueError):
    """Input that does not satisfy a contract; `errors` holds (path, reason) pairs."""

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.errors = errors or []

    @classmethod
    def from_validation(cls, exc: ValidationError, what: str, prefix: str = "") -> ContractError:
        """Callers catch one exception type whatever layer (envelope or payload) failed."""
        return cls(f"invalid {what}: {format_validation_error(exc, prefix)}", error_paths(exc, prefix))

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.errors]


def error_paths(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        parts = [prefix] if prefix else []
        parts += [str(p) for p in err["loc"]]
        out.append((".".join(parts) or "<root>", err["msg"]))
    return out


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    return "; ".join(f"{path}: {msg}" for path, msg in error_paths(exc, prefix))
