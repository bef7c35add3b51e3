"""One streaming execution over a many-file source, with the tiny model: every shard's
rows land exactly once, checkpoints commit while embedding goes on, each commit lists only
its own shards, each actor loads the model once, and on a cluster whose node offers a GPU
the embed actors go there while read tasks stay on the CPU node."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lance
import pytest
from conftest import REPO, loopback_cluster

from jobs._embed_job import run_embed
from operators import shard_labels
from operators.index import COMPACT_MIN_FRAGMENTS
from operators.write import JOB_KEY, SHARDS_KEY
from schemas.spec import parse_spec

N_FILES, PER_FILE = 4, 150


@pytest.fixture(scope="module")
def parts(tmp_path_factory, stdlib_docs) -> Path:
    root = tmp_path_factory.mktemp("parts")
    texts = [d["text"] for d in stdlib_docs]
    for f in range(N_FILES):
        with gzip.open(root / f"part-{f}.jsonl.gz", "wt", encoding="utf-8") as out:
            for i in range(PER_FILE):
                n = f * PER_FILE + i
                out.write(json.dumps({"id": f"d{n}", "text": f"{texts[n % len(texts)][:400]} "
                                      f"(copy {n})", "year": 2000 + n % 7}) + "\n")
    (root / "README.md").write_text("about these files")
    return root


def _spec(parts: Path, table: Path, model: str, **write) -> dict:
    return {"kind": "embed", "table": str(table), "model": {"name": model},
            "source": {"uri": str(parts), "id_field": "id", "records_per_shard": 50},
            "write": {"shards_per_commit": 2, "max_rows_per_file": 100,
                      "commit_interval_s": 0, **write}}


def test_many_files_one_execution_commits_as_it_goes(parts, tiny_model, tmp_path,
                                                     ray_local) -> None:
    table = tmp_path / "t.lance"
    summary = run_embed(parse_spec(_spec(parts, table, tiny_model, keep_checkpoints=True,
                                         max_rows_per_file=30)))
    assert summary.files == N_FILES and summary.files_skipped == {".md": 1}
    assert summary.documents == N_FILES * PER_FILE and summary.rejects == 0
    ds = lance.dataset(str(table))
    ids = ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist()
    assert sorted(set(ids)) == sorted(f"d{n}" for n in range(N_FILES * PER_FILE))
    assert len(ids) == len(set(ds.to_table(columns=["id"]).column("id").to_pylist()))
    assert summary.chunks == len(ids) == ds.count_rows()
    assert 1 <= summary.model_loads <= summary.profile["actors"]  # one load per actor, per job
    # Several checkpoints, each naming only the shards it added: disjoint, together all.
    assert summary.commits >= 3
    lists = []
    for v in ds.versions():
        txn = ds.read_transaction(v["version"])
        props = (txn.transaction_properties or {}) if txn else {}
        if JOB_KEY in props:
            lists.append(shard_labels.decode(props[SHARDS_KEY]))
    assert lists[0] == [] and len(lists) == summary.commits + 1  # and the table's creation
    lists = lists[1:]
    flat = [s for shard_list in lists for s in shard_list]
    assert len(flat) == len(set(flat)) == summary.shards
    assert max(len(x) for x in lists) <= 2 + 1  # shards_per_commit, plus one in the batch
    # The job's fragments were compacted at its end (by the driver: a small table), and
    # the shards each commit lists stay readable from the transaction log above.
    done = summary.compaction
    assert done["workers"] == 0 and done["fragments_written"] > COMPACT_MIN_FRAGMENTS
    assert done["fragments_after"] == len(ds.get_fragments()) < done["fragments_written"]
    again = run_embed(parse_spec(_spec(parts, table, tiny_model)))
    assert again.tokens == 0 and again.index == "unchanged" and again.commits == 0


def test_gpu_actors_go_to_the_gpu_node_and_read_tasks_stay_off_it(parts, tiny_model,
                                                                  tmp_path) -> None:
    """A node that declares a GPU (Ray takes its word) gets the embed actors; the CPU
    node gets the read tasks. torch sees no CUDA here, so the actor embeds on CPU."""
    import psutil
    from ray._private import ray_constants

    cluster, (gpu_node,) = loopback_cluster(
        head={"num_cpus": 2, "include_dashboard": False},
        workers=[{"num_cpus": 1, "num_gpus": 1}])
    try:
        raylet = {name: node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
                  for name, node in (("head", cluster.head_node), ("gpu", gpu_node))}
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(_spec(parts, tmp_path / "g.lance", tiny_model)
                                   | {"compute": {"gpus_per_actor": 1}}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen: dict[str, set[int]] = {"Embedder": set(), "ReadQuiverShards": set()}
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            for p in psutil.Process().children(recursive=True):
                try:
                    title = " ".join(p.cmdline())
                    for role in seen:  # this cluster's workers (not the tests' own Ray's)
                        if role in title and title.startswith("ray::") and \
                                p.ppid() in raylet.values():
                            seen[role].add(p.ppid())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out)["documents"] == N_FILES * PER_FILE
        assert seen["Embedder"] == {raylet["gpu"]}
        assert seen["ReadQuiverShards"] and seen["ReadQuiverShards"] <= {raylet["head"]}
    finally:
        cluster.shutdown()


def test_big_tables_get_their_indices_built_on_the_cluster(parts, tiny_model, tmp_path,
                                                           ray_local) -> None:
    """Above index.distributed_min_rows every index (ANN, hamming, BTREE, BITMAP and
    full-text) is built by lance-ray's workers (one segment each), and the fragments the
    job wrote are compacted by Ray tasks; search then finds a document by its text."""
    from jobs.api import open_table

    table = tmp_path / "big.lance"
    spec = _spec(parts, table, tiny_model) | {
        "index": {"ann_min_rows": 100, "distributed_min_rows": 100, "num_partitions": 2,
                  "filterable": ["year"]},
        "vectors": {"codecs": ["float32", "binary"]}}
    spec["source"]["metadata_fields"] = ["year"]
    spec["write"] |= {"shards_per_commit": 1, "max_rows_per_file": 40}  # many fragments
    summary = run_embed(parse_spec(spec))
    where = "; built on 2 workers"
    for built in ("IVF_HNSW_SQ (2 partitions", f"IVF_FLAT on vector_bits (2 partitions, "
                  f"hamming{where})", f"id: BTREE{where}", f"doc_id: BTREE{where}",
                  f"year: BITMAP{where}", f"INVERTED (BM25{where})"):
        assert built in summary.index, (built, summary.index)
    ds = lance.dataset(str(table))
    indices = ds.describe_indices()
    assert {i.field_names[0] for i in indices} == {"vector", "vector_bits", "text", "id",
                                                   "doc_id", "year"}
    # one segment per worker, except where a worker's share of fragments was empty
    assert all(1 <= len(i.segments) <= 2 for i in indices)
    done = summary.compaction
    assert done["workers"] == 2 and done["fragments_rewritten"] == done["fragments_written"]
    assert done["fragments_after"] == len(ds.get_fragments()) < done["fragments_written"]
    t = open_table(table)
    target = lance.dataset(str(table)).to_table(columns=["id", "text"], limit=1).to_pylist()[0]
    assert t.search(target["text"], k=3, mode="fts")[0].id == target["id"]
    assert target["id"] in [h.id for h in t.search(target["text"], k=10)]


def test_gpus_asked_for_and_never_offered_fail_clearly(parts, tiny_model, tmp_path,
                                                       ray_local) -> None:
    from schemas.errors import ClusterError

    spec = _spec(parts, tmp_path / "nogpu.lance", tiny_model) | {
        "compute": {"gpus_per_actor": 1, "gpu_wait_s": 1}}
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"asked for 1 GPU\(s\).*offered 0"):
        run_embed(parse_spec(spec))
    assert time.monotonic() - started < 120
    assert not (tmp_path / "nogpu.lance").exists()  # nothing was embedded


def test_auto_device_asks_for_the_gpus_the_autoscaler_offers(parts, tiny_model, tmp_path,
                                                             ray_local) -> None:
    """With `model.device: auto` and no GPU up, node types that offer GPUs (as the
    autoscaler publishes them to the GCS) make the actors ask for GPUs, not plan CPU
    actors; here none ever comes, so the job fails clearly before embedding anything."""
    import ray
    import ray._raylet as raylet
    from ray.core.generated import autoscaler_pb2

    from jobs._ray import autoscaler_gpus
    from schemas.errors import ClusterError

    key = raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    namespace = raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    config = autoscaler_pb2.ClusterConfig()
    for name, gpus, max_count in (("cpu_worker", 0, 4), ("gpu_worker", 1, 2)):
        group = config.node_group_configs.add(name=name, min_count=0, max_count=max_count)
        group.resources["CPU"] = 4
        if gpus:
            group.resources["GPU"] = gpus
    assert autoscaler_gpus() == 0  # a local Ray has no autoscaler
    gcs = raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    gcs.internal_kv_put(key, config.SerializeToString(), True, namespace)
    try:
        assert autoscaler_gpus() == 2
        spec = _spec(parts, tmp_path / "auto.lance", tiny_model) | {
            "compute": {"gpu_wait_s": 1}}
        with pytest.raises(ClusterError, match=r"asked for 2 GPU\(s\).*offered 0"):
            run_embed(parse_spec(spec))
        assert not (tmp_path / "auto.lance").exists()
        cpu_only = parse_spec({**spec, "model": {"name": tiny_model, "device": "cpu"}})
        assert run_embed(cpu_only).documents == N_FILES * PER_FILE
    finally:
        gcs.internal_kv_del(key, False, namespace)
