"""The citadel command line, run as a user runs it: a subprocess in a fresh directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import EXAMPLES


def citadel(*args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CITADEL_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "citadel.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_validate_accepts_every_example(tmp_path: Path) -> None:
    result = citadel("validate", *map(str, sorted(EXAMPLES.glob("*.yaml"))), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(list(EXAMPLES.glob("*.yaml")))


def test_validate_lists_every_problem_with_node_and_field_and_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump(
            {
                "name": "broken",
                "nodes": [
                    {"id": "a", "type": "python", "config": {"code": "def main(:\n  pass"}},
                    {"id": "b", "type": "transform", "needs": ["a", "ghost"], "config": {"output": "a.x +"}},
                    {"id": "c", "type": "smtp"},
                ],
            }
        )
    )
    result = citadel("validate", str(broken), cwd=tmp_path)
    assert result.returncode == 2
    for expected in (
        "nodes.a.config.code",
        "Python syntax error at line 1",
        "nodes.b.needs",
        "needs unknown node 'ghost'",
        "nodes.b.config.output",
        "does not parse",
        "nodes.c.type",
        "unknown node type 'smtp'",
    ):
        assert expected in result.stderr, (expected, result.stderr)


def test_validate_names_a_missing_file(tmp_path: Path) -> None:
    result = citadel("validate", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot read nope.yaml" in result.stderr


def test_schema_is_a_json_schema_that_accepts_the_examples(tmp_path: Path) -> None:
    result = citadel("schema", cwd=tmp_path)
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in EXAMPLES.glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    commands = json.loads(citadel("schema", "--commands", cwd=tmp_path).stdout)
    assert "StartRun" in commands["properties"]["type"]["enum"]


def test_run_prints_outputs_and_a_node_summary(tmp_path: Path) -> None:
    result = citadel("run", str(EXAMPLES / "linear.yaml"), "--input", '{"n": 5}', "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "completed"
    assert report["outputs"] == {"result": 101, "note": "100 plus one"}
    assert {n: v["status"] for n, v in report["nodes"].items()} == {
        "double": "succeeded",
        "square": "succeeded",
        "bonus": "succeeded",
        "report": "succeeded",
    }
    assert all(v["attempts"] == 1 for v in report["nodes"].values())
    assert (tmp_path / ".citadel" / "events.db").exists()


def test_a_failed_run_exits_1_and_says_which_node_failed(tmp_path: Path) -> None:
    failing = tmp_path / "failing.yaml"
    failing.write_text(
        yaml.safe_dump(
            {
                "name": "failing",
                "nodes": [
                    {
                        "id": "boom",
                        "type": "python",
                        "config": {"code": "def main():\n    raise ValueError('no good')\n"},
                    }
                ],
            }
        )
    )
    result = citadel("run", str(failing), cwd=tmp_path)
    assert result.returncode == 1
    assert "node 'boom' failed after 1 attempt(s): ValueError: no good" in result.stdout


def test_run_rejects_input_that_does_not_match_the_schema(tmp_path: Path) -> None:
    result = citadel("run", str(EXAMPLES / "linear.yaml"), "--input", '{"n": "five"}', cwd=tmp_path)
    assert result.returncode == 2
    assert "input.n" in result.stderr and "is not of type 'integer'" in result.stderr


@pytest.mark.parametrize("bad", ["{", "[1, 2]"])
def test_run_rejects_input_that_is_not_a_json_object(tmp_path: Path, bad: str) -> None:
    result = citadel("run", str(EXAMPLES / "linear.yaml"), "--input", bad, cwd=tmp_path)
    assert result.returncode == 2
    assert "--input" in result.stderr


def test_worker_without_kafka_explains_what_to_set(tmp_path: Path) -> None:
    result = citadel("worker", cwd=tmp_path)
    assert result.returncode == 2
    assert "CITADEL_KAFKA" in result.stderr


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = citadel("--help", cwd=tmp_path)
    for command in ("up", "run", "validate", "worker", "schema", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("args", [["signal", "r1", "review", "--payload", "{}"], ["cancel", "r1"]])
def test_signal_and_cancel_without_a_running_engine_say_how_to_start_one(
    tmp_path: Path, args: list[str]
) -> None:
    result = citadel(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "no running engine: start one with `citadel up`" in result.stderr


def test_signal_rejects_a_payload_that_is_not_json(tmp_path: Path) -> None:
    result = citadel("signal", "r1", "review", "--payload", "{nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "--payload is not JSON" in result.stderr


def test_runs_rerun_reuses_upstream_outputs_and_executes_from_the_node_with_the_current_definition(
    tmp_path: Path,
) -> None:
    def version(number: int, body: str) -> Path:
        path = tmp_path / f"v{number}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": "rerunnable",
                    "version": number,
                    "nodes": [
                        {
                            "id": "draw",
                            "type": "python",
                            "config": {"code": "import random\ndef main():\n    return random.random()\n"},
                        },
                        {
                            "id": "use",
                            "type": "python",
                            "needs": ["draw"],
                            "config": {"inputs": {"x": "draw"}, "code": f"def main(x):\n    {body}\n"},
                        },
                    ],
                    "outputs": {"drawn": "draw", "used": "use"},
                }
            )
        )
        return path

    first = citadel("run", str(version(1, "raise ValueError('bug')")), "--json", cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    original = json.loads(first.stdout)
    assert citadel("run", str(version(2, "return x")), cwd=tmp_path).returncode == 0  # deploys v2

    rerun = citadel(
        "runs",
        "rerun",
        original["run_id"],
        "--from",
        "use",
        "--definition",
        "current",
        "--json",
        cwd=tmp_path,
    )
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["run_id"] != original["run_id"]
    assert report["nodes"]["draw"]["status"] == "reused"
    assert report["nodes"]["use"]["status"] == "succeeded"
    assert report["outputs"]["drawn"] == report["outputs"]["used"]  # the original draw, not a new one
    history = citadel("runs", "history", report["run_id"], "--json", cwd=tmp_path)
    started = json.loads(history.stdout.splitlines()[0])
    assert started["payload"]["rerun_of"] == {"run_id": original["run_id"], "from_node": "use"}
    assert started["payload"]["workflow_version"] == 2

    missing = citadel("runs", "rerun", original["run_id"], "--from", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2
    assert "has no node 'nowhere'" in missing.stderr


def test_deploy_stores_the_tenants_workflow_and_says_whether_the_version_is_new(tmp_path: Path) -> None:
    from aggregates.store import RunStore

    example = str(EXAMPLES / "orders-trigger.yaml")

    first = citadel("deploy", example, "--tenant", "acme", cwd=tmp_path)
    again = citadel("deploy", example, "--tenant", "acme", cwd=tmp_path)
    changed = tmp_path / "changed.yaml"
    changed.write_text((EXAMPLES / "orders-trigger.yaml").read_text().replace("* 1.2", "* 1.3"))
    conflict = citadel("deploy", str(changed), "--tenant", "acme", cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert "workflow 'orders' of tenant 'acme': version 1 deployed (new)" in first.stdout
    assert "version 1 already deployed (unchanged)" in again.stdout
    assert conflict.returncode == 2
    assert "version 1 of workflow 'orders' is already deployed with a different definition" in conflict.stderr
    store = RunStore(f"sqlite:///{tmp_path / '.citadel' / 'events.db'}")
    try:
        deployed = store.workflow("acme.orders").definition()
    finally:
        store.close()
    assert deployed.triggers[0].topic == "acme.orders"  # a tenant's topics are its own


def test_deploy_refuses_an_invalid_definition_or_tenant_and_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"name": "b", "nodes": [], "triggers": [{"topic": "citadel.commands"}]}))

    invalid = citadel("deploy", str(broken), cwd=tmp_path)
    bad_tenant = citadel("deploy", str(EXAMPLES / "linear.yaml"), "--tenant", "Acme.Corp", cwd=tmp_path)

    assert invalid.returncode == 2
    assert "triggers[0].topic" in invalid.stderr and "nodes" in invalid.stderr
    assert bad_tenant.returncode == 2 and "a tenant is" in bad_tenant.stderr
