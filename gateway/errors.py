"""The errors a gateway caller may see. Anything else is masked as an internal error."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request, and where (a definition's node and field, an argument)."""

    location: str
    message: str
    node: str | None = None


@dataclass
class GatewayError(Exception):
    """An error whose message is meant for the caller; `code` lands in the GraphQL error extensions."""

    message: str
    code: str = "BAD_REQUEST"
    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    @property
    def extensions(self) -> dict[str, object]:
        """What graphql-core copies into the error's `extensions`."""
        found: dict[str, object] = {"code": self.code}
        if self.problems:
            found["problems"] = [
                {"location": p.location, "message": p.message, "node": p.node} for p in self.problems
            ]
        return found


def not_found(what: str) -> GatewayError:
    """The same answer for what does not exist and what belongs to another tenant: nothing leaks."""
    return GatewayError(f"{what} not found", "NOT_FOUND")


def forbidden(permission: str) -> GatewayError:
    return GatewayError(f"this token's roles do not grant {permission!r}", "FORBIDDEN")


def unauthenticated(reason: str) -> GatewayError:
    return GatewayError(reason, "UNAUTHENTICATED")
