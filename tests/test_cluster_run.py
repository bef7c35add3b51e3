"""The same job on a two-node Ray cluster on loopback gives the same table as a local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import pytest
from conftest import REPO, loopback_cluster, write_jsonl

from jobs.api import open_table

QUERIES = ("parse command line options", "compress data", "threads and locks")


def _spec(corpus: Path, table: Path, model: str) -> Path:
    spec = table.with_suffix(".yaml")
    spec.write_text(f"kind: embed\nsource: {{uri: {corpus}, id_field: id, "
                    f"records_per_shard: 8}}\ntable: {table}\nmodel: {{name: {model}}}\n")
    return spec


def _run(spec: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def two_nodes():

    cluster, _ = loopback_cluster(head={"num_cpus": 1, "include_dashboard": False},
                                  workers=[{"num_cpus": 1}])
    yield cluster
    cluster.shutdown()


@pytest.mark.heavy  # CI's 30 minutes: a two-node run stays in CI via test_streaming_job
def test_two_node_run_matches_local_run(two_nodes, stdlib_docs, tiny_model,
                                        tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl",
                         [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:30]])
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base["HF_HUB_OFFLINE"] = "1"
    local = _run(_spec(corpus, tmp_path / "local.lance", tiny_model), base)
    remote = _run(_spec(corpus, tmp_path / "cluster.lance", tiny_model),
                  {**base, "RAY_ADDRESS": two_nodes.address})
    assert remote["chunks"] == local["chunks"] and remote["documents"] == 30

    def ids(name: str) -> list[str]:
        ds = lance.dataset(str(tmp_path / name))
        return sorted(ds.to_table(columns=["id"]).column("id").to_pylist())

    assert ids("cluster.lance") == ids("local.lance")
    a, b = open_table(tmp_path / "local.lance"), open_table(tmp_path / "cluster.lance")
    for q in QUERIES:
        hits_a, hits_b = a.search(q, k=5), b.search(q, k=5)
        assert [h.id for h in hits_a] == [h.id for h in hits_b]
        assert [h.score for h in hits_a] == pytest.approx([h.score for h in hits_b], abs=1e-4)
