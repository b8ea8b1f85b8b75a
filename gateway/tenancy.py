"""How workflows are scoped to tenants: a tenant's workflow `NAME` is deployed as `TENANT.NAME`.

The `Workflow` aggregate is keyed by name alone, so the gateway namespaces every name it
deploys, resolves and lists; a tenant never names (or guesses) another's workflow, because
it cannot spell the prefix. Tenants contain no dot (`auth.TENANT`), so the prefix is
unambiguous. A subworkflow node's `workflow` is namespaced the same way, so a child run
starts the caller's own workflow; and so are the user topics a definition reads (its Kafka
triggers) and writes (its `kafka` nodes): tenant acme's topic `orders` is `acme.orders` on the
broker, so no tenant reads or writes another's topics through the gateway.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any


def scoped(tenant: str, name: str) -> str:
    return f"{tenant}.{name}"


def public(tenant: str, stored: str) -> str:
    """The name a tenant sees: its own prefix removed (a run started outside the gateway has none)."""
    prefix = f"{tenant}."
    return stored[len(prefix) :] if stored.startswith(prefix) else stored


def owns(tenant: str, stored: str) -> bool:
    return stored.startswith(f"{tenant}.")


# Per node type, the config field that names a workflow or a topic of the tenant's.
_NAMED_BY_NODES = {"subworkflow": "workflow", "kafka": "topic"}


def scoped_definition(tenant: str, document: dict[str, Any]) -> dict[str, Any]:
    """The definition as deployed for `tenant`: its name, its subworkflows' names and its user
    topics namespaced."""
    return _renamed(document, lambda name: scoped(tenant, name))


def public_definition(tenant: str, document: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `scoped_definition`, for showing a deployed definition to its tenant."""
    return _renamed(document, lambda name: public(tenant, name))


def _renamed(document: dict[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    renamed = copy.deepcopy(document)
    if isinstance(renamed.get("name"), str):
        renamed["name"] = rename(renamed["name"])
    for node in renamed.get("nodes") or []:
        if not isinstance(node, dict):
            continue
        config, field = node.get("config"), _NAMED_BY_NODES.get(str(node.get("type")))
        if field is not None and isinstance(config, dict) and isinstance(config.get(field), str):
            config[field] = rename(config[field])
    for trigger in renamed.get("triggers") or []:
        if isinstance(trigger, dict) and isinstance(trigger.get("topic"), str):
            trigger["topic"] = rename(trigger["topic"])
    return renamed
