"""Settings come from CITADEL_* variables; the admission limits have defaults sized to the executors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from citadel.settings import Settings


def test_each_tenant_may_keep_four_rounds_of_the_executors_busy_by_default() -> None:
    settings = Settings.from_env({"CITADEL_EXECUTOR_CONCURRENCY": "6"})
    assert settings.tenant_concurrency == 24
    assert settings.workflow_concurrency is None
    assert settings.node_type_concurrency == {}


def test_admission_limits_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "CITADEL_TENANT_CONCURRENCY": "10",
            "CITADEL_WORKFLOW_CONCURRENCY": "3",
            "CITADEL_NODE_TYPE_CONCURRENCY": "python=4, http=32",
        }
    )
    assert settings.tenant_concurrency == 10
    assert settings.workflow_concurrency == 3
    assert settings.node_type_concurrency == {"python": 4, "http": 32}


def test_a_malformed_node_type_limit_names_the_variable_and_the_expected_form() -> None:
    with pytest.raises(ValueError, match=r"CITADEL_NODE_TYPE_CONCURRENCY: 'python4' is not TYPE=NUMBER"):
        Settings.from_env({"CITADEL_NODE_TYPE_CONCURRENCY": "python4"})


def test_a_limit_of_zero_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"node_type_concurrency\.python"):
        Settings.from_env({"CITADEL_NODE_TYPE_CONCURRENCY": "python=0"})


def test_the_sandbox_offers_the_engines_packages_and_64_mib_of_scratch_by_default() -> None:
    settings = Settings.from_env({})
    assert settings.sandbox_packages is None
    assert settings.sandbox_scratch_mb == 64
    assert settings.sandbox_uid == 65534


def test_sandbox_packages_are_a_path_list_and_empty_means_the_standard_library_only() -> None:
    listed = Settings.from_env({"CITADEL_SANDBOX_PACKAGES": "/opt/a:/opt/b", "CITADEL_SANDBOX_UID": "2000"})
    assert [str(path) for path in listed.sandbox_packages or []] == ["/opt/a", "/opt/b"]
    assert listed.sandbox_uid == 2000
    assert Settings.from_env({"CITADEL_SANDBOX_PACKAGES": ""}).sandbox_packages == []


def test_a_sandbox_uid_of_root_is_refused() -> None:
    with pytest.raises(ValidationError, match="sandbox_uid"):
        Settings.from_env({"CITADEL_SANDBOX_UID": "0"})
