"""`quiver submit` and `quiver jobs` against a real Ray head with its dashboard on
127.0.0.1 and a second node joined: submit, follow to completion, check the table, list,
status, logs, and stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lance
import pytest
from conftest import REPO, free_port, loopback_cluster, write_jsonl


@pytest.fixture(scope="module")
def cluster():

    port = free_port()
    # Two nodes on one machine: each dashboard agent needs its own port.
    cluster, _ = loopback_cluster(
        head={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
              "dashboard_port": port, "dashboard_agent_listen_port": free_port()},
        workers=[{"num_cpus": 1, "dashboard_agent_listen_port": free_port()}])
    address = f"http://127.0.0.1:{port}"
    from ray.job_submission import JobSubmissionClient

    for _ in range(60):  # the dashboard's job module comes up a little after the head
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:  # noqa: BLE001 - any failure here means "not up yet"
            time.sleep(1)
    yield address
    cluster.shutdown()


def _quiver(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_submit_follow_and_manage(cluster, stdlib_docs, tmp_path: Path) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[300:324]]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    (tmp_path / "spec.yaml").write_text(
        "kind: embed\nsource: {uri: docs.jsonl, id_field: id, records_per_shard: 6}\n"
        "table: out/docs.lance\n")  # relative paths, resolved against the submit directory
    out = _quiver("submit", "spec.yaml", "--address", cluster, "--follow", "--json",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout)
    assert final["status"] == "SUCCEEDED", out.stderr[-5000:]
    assert "checkpoint committed" in out.stderr  # the job's own progress, streamed
    table = lance.dataset(str(tmp_path / "out" / "docs.lance"))
    assert {i.split("#")[0] for i in table.to_table(columns=["id"]).column("id").to_pylist()} \
        == {d["id"] for d in docs}

    listed = json.loads(_quiver("jobs", "list", "--address", cluster, "--json",
                                cwd=tmp_path).stdout)
    assert final["id"] in [j["id"] for j in listed]
    status = json.loads(_quiver("jobs", "status", final["id"], "--address", cluster,
                                "--json", cwd=tmp_path).stdout)
    assert status["status"] == "SUCCEEDED"
    assert status["table"] == str((tmp_path / "out" / "docs.lance").resolve())
    logs = _quiver("jobs", "logs", final["id"], "--address", cluster, cwd=tmp_path).stdout
    assert '"chunks"' in logs  # the job printed its JSON summary
    # which is how a remote scheduled run's history gets its counts and node-hours
    from jobs.submit import summary_from_logs

    summary = summary_from_logs(logs)
    assert summary["chunks"] == table.count_rows() and summary["node_hours"]

    # A second submission, stopped while it runs.
    (tmp_path / "slow.yaml").write_text(
        "kind: embed\nsource: {uri: docs.jsonl, id_field: id, records_per_shard: 2}\n"
        "table: out/slow.lance\nwrite: {shards_per_commit: 1}\n")
    job_id = _quiver("submit", "slow.yaml", "--address", cluster, cwd=tmp_path).stdout.strip()
    assert _quiver("jobs", "stop", job_id, "--address", cluster, cwd=tmp_path).returncode == 0
    for _ in range(120):
        state = json.loads(_quiver("jobs", "status", job_id, "--address", cluster, "--json",
                                   cwd=tmp_path).stdout)["status"]
        if state in ("STOPPED", "FAILED", "SUCCEEDED"):
            break
        time.sleep(1)
    assert state == "STOPPED"


def test_jobs_without_an_address_is_a_clear_error(tmp_path: Path) -> None:
    out = _quiver("jobs", "list", cwd=tmp_path)
    assert out.returncode == 2 and "--address" in out.stderr
