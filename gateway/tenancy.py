"""How workflows are scoped to tenants: a tenant's workflow `NAME` is deployed as `TENANT.NAME`.

The `Workflow` aggregate is keyed by name alone, so the gateway namespaces every name it
deploys, resolves and lists; a tenant never names (or guesses) another's workflow, because
it cannot spell the prefix. Tenants contain no dot (`auth.TENANT`), so the prefix is
unambiguous. A subworkflow node's `workflow` is namespaced the same way, so a child run
starts the caller's own workflow; and so are the user topics a definition reads (its Kafka
triggers) and writes (its `kafka` nodes): tenant acme's topic `orders` is `acme.orders` on the
broker, so no tenant reads or writes another's topics through the gateway. The secrets a
definition names (an http node's or step's `secrets` and `{{secret:NAME}}` headers, its webhook's
and notify targets' `secret`) are the tenant's too: acme's `API_TOKEN` is the engine's secret
`acme.API_TOKEN`, so no tenant can have another's secret sent anywhere.
"""

from __future__ import annotations

import copy
import re
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
SECRET_REFERENCE = re.compile(r"(\{\{\s*secret:)([^}]*?)(\s*\}\})")


def scoped_definition(tenant: str, document: dict[str, Any]) -> dict[str, Any]:
    """The definition as deployed for `tenant`: its name, its subworkflows' names, its user
    topics and its secrets' names namespaced."""
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
        _rename_step(node, rename)
        config = node.get("config")
        if node.get("type") == "map" and isinstance(config, dict):
            _rename_step(config.get("node"), rename)
        _rename_step(node.get("compensate"), rename)
    for trigger in renamed.get("triggers") or []:
        if isinstance(trigger, dict) and isinstance(trigger.get("topic"), str):
            trigger["topic"] = rename(trigger["topic"])
    for holder in [renamed.get("webhook"), *(renamed.get("notify") or [])]:
        if isinstance(holder, dict) and isinstance(holder.get("secret"), str):
            holder["secret"] = rename(holder["secret"])
    return renamed


def _rename_step(step: Any, rename: Callable[[str], str]) -> None:
    """A node's (or a map's or compensation's step's) workflow, topic and secret names."""
    if not isinstance(step, dict) or not isinstance(step.get("config"), dict):
        return
    config = step["config"]
    field = _NAMED_BY_NODES.get(str(step.get("type")))
    if field is not None and isinstance(config.get(field), str):
        config[field] = rename(config[field])
    if step.get("type") != "http":
        return
    if isinstance(config.get("secrets"), list):
        config["secrets"] = [rename(n) if isinstance(n, str) else n for n in config["secrets"]]
    headers = config.get("headers")
    if isinstance(headers, dict):
        for header, value in headers.items():
            if isinstance(value, str):
                headers[header] = SECRET_REFERENCE.sub(lambda m: m[1] + rename(m[2].strip()) + m[3], value)
