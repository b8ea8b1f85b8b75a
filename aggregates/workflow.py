"""The `Workflow` aggregate: the deployed versions of one workflow definition."""

from __future__ import annotations

import uuid
from typing import Any

from eventsourcing.domain import Aggregate, event

from schemas.definition import WorkflowDefinition

WORKFLOW_NAMESPACE = uuid.UUID("6f1c2a43-0d7e-4c7b-9a4e-3c1f2b8d9e01")
# The store's topics of this aggregate's events: Registered names a workflow, Deployed does not.
REGISTERED = "aggregates.workflow:Workflow.Registered"
DEPLOYED = "aggregates.workflow:Workflow.Deployed"
DEFAULT_TENANT = "default"


class VersionConflict(Exception):
    """A version number was deployed before with a different definition."""


def workflow_id(name: str) -> uuid.UUID:
    return uuid.uuid5(WORKFLOW_NAMESPACE, name)


def tenant_of(name: str) -> str:
    """The tenant a deployed workflow belongs to: `TENANT.NAME` as the gateway deploys it
    (see gateway/tenancy.py), else the default tenant."""
    tenant, dot, _ = name.partition(".")
    return tenant if dot else DEFAULT_TENANT


class Workflow(Aggregate):
    @staticmethod
    def create_id(name: str, **_: Any) -> uuid.UUID:
        return workflow_id(name)

    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name
        self.versions: dict[str, dict[str, Any]] = {}  # str(version) -> {digest, definition}

    def deploy(self, definition: WorkflowDefinition) -> bool:
        """Record a new version; True if it was new, False if it is already deployed as is."""
        known = self.versions.get(str(definition.version))
        digest = definition.digest()
        if known is not None:
            if known["digest"] == digest:
                return False
            raise VersionConflict(
                f"version {definition.version} of workflow {self.name!r} is already deployed with a "
                f"different definition; give the new definition a higher version"
            )
        self._deployed(
            version=definition.version, digest=digest, definition=definition.model_dump(mode="json")
        )
        return True

    @event("Deployed")
    def _deployed(self, version: int, digest: str, definition: dict[str, Any]) -> None:
        self.versions[str(version)] = {"digest": digest, "definition": definition}

    def latest_version(self) -> int:
        return max(int(v) for v in self.versions)

    def definition(self, version: int | None = None) -> WorkflowDefinition:
        chosen = self.latest_version() if version is None else version
        known = self.versions.get(str(chosen))
        if known is None:
            raise KeyError(f"workflow {self.name!r} has no version {chosen}")
        return WorkflowDefinition.model_validate(known["definition"])
