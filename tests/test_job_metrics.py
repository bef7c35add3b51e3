"""Operating a job: its counters in Ray's own metrics (a job on a local Ray cluster
started with a Prometheus export port on 127.0.0.1, scraped while its driver is still
up), and what it cost (node-hours by node type, priced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, loopback_cluster, write_jsonl
from prometheus_client.parser import text_string_to_metric_families

from jobs._embed_service import EARLY_ENV

DRIVER = """
import json, sys
from jobs._embed_job import run_embed
from schemas.spec import parse_spec
summary = run_embed(parse_spec(json.loads(sys.argv[1])))
print(json.dumps(summary.to_dict()), flush=True)
sys.stdin.read()  # stay up (and keep reporting) until the test has scraped
"""


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """Quiver's series on the node's export, summed over Ray's own labels (worker, node):
    {(name, table): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_quiver_"):
                key = (s.name, s.labels.get("table", ""))
                out[key] = out.get(key, 0.0) + s.value
    return out


@pytest.mark.parametrize("early", ["0", "1"], ids=["pool", "early-actor"])
def test_a_jobs_counters_reach_rays_prometheus_export(tmp_path: Path, stdlib_docs,
                                                      tiny_model, early: str) -> None:
    """The driver's exact counts and the embed actor's own, whether the job embedded on
    the actor pool or on the one actor a small run starts while it plans."""
    port = free_port()
    cluster, _ = loopback_cluster(head={"num_cpus": 2, "include_dashboard": False,
                                        "metrics_export_port": port}, workers=[])
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:40]]
    docs.append({"id": "", "text": "a record with no id is rejected"})
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    spec = {"kind": "embed", "table": str(tmp_path / "metered.lance"),
            "model": {"name": tiny_model}, "source": {"uri": str(corpus), "id_field": "id"},
            "cost": {"prices": {"cpu2": 0.5}, "currency": "EUR"}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address,
           EARLY_ENV: early}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], cwd=REPO,
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        summary = json.loads(driver.stdout.readline())
        expected = {"ray_quiver_job_documents_read_total": 41.0,
                    "ray_quiver_job_documents_rejected_total": 1.0,
                    "ray_quiver_job_documents_embedded_total": 40.0,
                    "ray_quiver_job_chunks_total": float(summary["chunks"]),
                    "ray_quiver_job_tokens_total": float(summary["tokens"]),
                    "ray_quiver_job_commits_total": float(summary["commits"])}
        assert summary["documents"] == 40 and summary["rejects"] == 1
        assert summary["profile"]["actor_early"] == (early == "1")
        # one node of 2 CPUs (named by its shape), up for the whole job: its hours are the
        # job's own seconds, up to the summary's last steps after the final sample (and
        # the rounding of both: hours to 6 places, seconds to 2)
        (kind, hours), = summary["node_hours"].items()
        assert kind == "cpu2" and 0.8 * summary["seconds"] <= hours * 3600 \
            <= summary["seconds"] + 0.01
        cost = summary["cost"]
        assert cost["currency"] == "EUR" and cost["unpriced"] == []
        assert cost["total"] == pytest.approx(0.5 * hours, abs=1e-6)
        assert cost["per_million_documents"] == pytest.approx(cost["total"] / 40 * 1e6,
                                                              rel=1e-3)
        assert cost["per_million_tokens"] == pytest.approx(
            cost["total"] / summary["tokens"] * 1e6, rel=1e-3)
        deadline, seen = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            seen = _scrape(port)
            if all(seen.get((n, "metered")) == v for n, v in expected.items()) \
                    and seen.get(("ray_quiver_embed_rows_total", "metered")):
                break
            time.sleep(2)
        got = {n: seen.get((n, "metered")) for n in expected}
        assert got == expected  # the driver's counts are exact
        # the actors' own: reported every few seconds, so at most the driver's
        assert 0 < seen[("ray_quiver_embed_rows_total", "metered")] <= summary["chunks"]
        assert seen.get(("ray_quiver_embed_batches_total", "metered"), 0) > 0
        assert seen.get(("ray_quiver_embed_busy_seconds_total", "metered"), 0) > 0
        assert seen.get(("ray_quiver_embed_tokens_total", "metered"), 0) \
            <= summary["tokens"]
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
        cluster.shutdown()


@pytest.mark.parametrize(("uri", "tag"), [("/data/docs.lance", "docs"),
                                          ("s3://b/t/news.lance/", "news"), ("plain", "plain")])
def test_the_table_tag_is_the_folder_name(uri: str, tag: str) -> None:
    from jobs._job_metrics import table_tag

    assert table_tag(uri) == tag


def test_node_hours_follow_the_nodes_up_while_the_job_ran() -> None:
    """A node up from the start counts from the job's start; one the autoscaler adds
    counts from when it was first seen; a dead one stops counting; types come from the
    launcher's cluster.yaml (the repository's own)."""
    from operators.cost import NodeClock, job_cost, launcher_node_types

    types = launcher_node_types(REPO / "cluster.yaml")
    assert types == {"head": {"CPU": 8}, "gpu_worker": {"CPU": 4, "GPU": 1},
                     "cpu_worker": {"CPU": 32}}
    now = [100.0]
    head = {"NodeID": "h", "Alive": True, "Resources": {"CPU": 8.0, "memory": 3e10}}
    gpu = {"NodeID": "g", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}
    odd = {"NodeID": "o", "Alive": True, "Resources": {"CPU": 2.0}}
    up = [head]
    clock = NodeClock(node_types=types, nodes=lambda: up, clock=lambda: now[0], started=40.0)
    clock.sample()  # the head, up since the job started at t=40
    now[0], up = 1840.0, [head, gpu, odd]
    clock.sample()
    now[0] = 1845.0
    clock.sample(force=False)  # within SAMPLE_EVERY_S: not sampled
    now[0], gpu["Alive"] = 5440.0, False
    clock.sample()
    hours = clock.node_hours()
    assert hours == {"cpu2": 1.0, "gpu_worker": 0.0, "head": 1.5}
    now[0], gpu["Alive"], up = 5600.0, True, [head, gpu]
    clock.sample()
    assert clock.node_hours()["gpu_worker"] == pytest.approx((5600 - 1840) / 3600, abs=1e-6)
    cost = job_cost({"head": 1.5, "cpu2": 1.0}, {"head": 0.4}, documents=2_000_000,
                    tokens=0, currency="USD")
    assert cost["total"] == pytest.approx(0.6) and cost["unpriced"] == ["cpu2"]
    assert cost["per_million_documents"] == pytest.approx(0.3)
    assert cost["per_million_tokens"] is None


def test_plan_prices_the_nodes_up_now_for_the_estimated_time(ray_local, tmp_path) -> None:
    import ray

    from jobs._dryrun import _estimated_cost
    from operators.cost import shape_name
    from schemas.errors import SpecError
    from schemas.spec import parse_spec

    shape = shape_name(ray.nodes()[0]["Resources"])
    spec = parse_spec({"kind": "embed", "table": str(tmp_path / "t.lance"),
                       "source": {"uri": "c.jsonl", "id_field": "id"},
                       "cost": {"prices": {shape: 0.25}}})
    out = _estimated_cost(spec, seconds=7200, documents=1000, tokens=50_000)
    assert out["node_hours"] == {shape: 2.0}
    assert out["cost"]["total"] == pytest.approx(0.5)
    bad = spec.model_copy(update={"cost": spec.cost.model_copy(
        update={"cluster_yaml": str(tmp_path / "missing.yaml")})})
    with pytest.raises(SpecError, match="cost.cluster_yaml"):
        _estimated_cost(bad, seconds=1, documents=1, tokens=1)


def test_the_grafana_dashboard_plots_only_metrics_quiver_exports() -> None:
    """docs/grafana/quiver.json names each job counter, and every metric it names is one
    the server's registry or the job's Ray counters export (as Prometheus spells them)."""
    import re

    from jobs._job_metrics import ACTOR_COUNTERS, DRIVER_COUNTERS
    from jobs._metrics import ServerMetrics

    board = json.loads((REPO / "docs" / "grafana" / "quiver.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    named = {m for e in exprs for m in re.findall(r"\b(?:ray_)?quiver_[a-z_]+", e)}
    server = ServerMetrics(open_versions=lambda: 0, model_loads=lambda: 0)
    server.request("/tables/{name}/search", "dense", 200, 0.01)
    server.request("/tables", "none", 401, 0.001)
    server.search("t", "dense", {"embed": 0.001})
    exported = {s.name for family in text_string_to_metric_families(server.text().decode())
                for s in family.samples}
    exported |= {f"ray_{n}_total" for n in (*DRIVER_COUNTERS, *ACTOR_COUNTERS)}
    assert named <= exported, named - exported
    assert {f"ray_{n}_total" for n in (*DRIVER_COUNTERS, *ACTOR_COUNTERS)} <= named
    assert len(exprs) >= 15 and all(p["datasource"]["uid"] == "${datasource}"
                                    for p in board["panels"] if p["type"] != "row")
