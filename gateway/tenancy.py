"""How workflows are scoped to tenants: a tenant's workflow `NAME` is deployed as `TENANT.NAME`.

The `Workflow` aggregate is keyed by name alone, so the gateway namespaces every name it
deploys, resolves and lists; a tenant never names (or guesses) another's workflow, because
it cannot spell the prefix. Tenants contain no dot (`auth.TENANT`), so the prefix is
unambiguous. A subworkflow node's `workflow` is namespaced the same way, so a child run
starts the caller's own workflow.
"""

from __future__ import annotations

import copy
from typing import Any


def scoped(tenant: str, name: str) -> str:
    return f"{tenant}.{name}"


def public(tenant: str, stored: str) -> str:
    """The name a tenant sees: its own prefix removed (a run started outside the gateway has none)."""
    prefix = f"{tenant}."
    return stored[len(prefix) :] if stored.startswith(prefix) else stored


def owns(tenant: str, stored: str) -> bool:
    return stored.startswith(f"{tenant}.")


def scoped_definition(tenant: str, document: dict[str, Any]) -> dict[str, Any]:
    """The definition as deployed for `tenant`: its name and its subworkflows' names namespaced."""
    deployed = copy.deepcopy(document)
    if isinstance(deployed.get("name"), str):
        deployed["name"] = scoped(tenant, deployed["name"])
    for node in deployed.get("nodes") or []:
        config = node.get("config") if isinstance(node, dict) else None
        if (
            node.get("type") == "subworkflow"
            and isinstance(config, dict)
            and isinstance(config.get("workflow"), str)
        ):
            config["workflow"] = scoped(tenant, config["workflow"])
    return deployed


def public_definition(tenant: str, document: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `scoped_definition`, for showing a deployed definition to its tenant."""
    shown = copy.deepcopy(document)
    shown["name"] = public(tenant, shown.get("name", ""))
    for node in shown.get("nodes") or []:
        config = node.get("config")
        if node.get("type") == "subworkflow" and isinstance(config, dict) and "workflow" in config:
            config["workflow"] = public(tenant, config["workflow"])
    return shown
