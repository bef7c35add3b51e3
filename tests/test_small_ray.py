"""Small Rays: the embed actors never take the last CPU that read and write tasks need.

Each job runs in its own process with its own Ray, so the CPU count is the one given
here and not the machine's; a layout that starves the read tasks hangs, and the timeout
turns the hang into a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lance
from conftest import REPO, chunk_ids, write_jsonl

JOB = """
import json, sys, ray
from jobs._ray import LOOPBACK, ray_on_loopback
with ray_on_loopback():
    ray.init(num_cpus={cpus}, include_dashboard=False, _node_ip_address=LOOPBACK)
from jobs._embed_job import run_embed
from schemas.spec import parse_spec
summary = run_embed(parse_spec(json.loads(sys.argv[1])))
print(json.dumps({{"chunks": summary.chunks}}))
"""


def test_a_one_cpu_ray_finishes_the_job(stdlib_docs, model_info, tiny_model,
                                        tmp_path) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:20]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    spec = {"kind": "embed", "table": str(table), "model": {"name": tiny_model},
            "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 10}}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", JOB.format(cpus=1), json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = sorted(lance.dataset(str(table)).to_table(columns=["id"]).column("id").to_pylist())
    assert ids == chunk_ids(model_info, docs)
