"""A running job's counters in Ray's own metrics: a job on a local Ray cluster (started
with a Prometheus export port on 127.0.0.1), scraped while its driver is still up."""

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


def test_a_jobs_counters_reach_rays_prometheus_export(tmp_path: Path, stdlib_docs,
                                                      tiny_model) -> None:
    port = free_port()
    cluster, _ = loopback_cluster(head={"num_cpus": 2, "include_dashboard": False,
                                        "metrics_export_port": port}, workers=[])
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:40]]
    docs.append({"id": "", "text": "a record with no id is rejected"})
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    spec = {"kind": "embed", "table": str(tmp_path / "metered.lance"),
            "model": {"name": tiny_model}, "source": {"uri": str(corpus), "id_field": "id"}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
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
        assert 0 < seen.get(("ray_quiver_embed_batches_total", "metered"), 0)
        assert 0 < seen.get(("ray_quiver_embed_busy_seconds_total", "metered"), 0)
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
