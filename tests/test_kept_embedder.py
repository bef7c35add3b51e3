"""The warm scheduler's kept embed actor (`jobs._embed_service`): small runs with
`QUIVER_KEEP_EMBEDDER=1` embed on one detached actor that keeps the model loaded between
runs, and store what the usual actor pool stores."""

from __future__ import annotations

import os

import lance
import numpy as np
import pyarrow as pa
import pytest
from conftest import write_jsonl

from jobs._embed_job import run_embed
from jobs._embed_service import KEEP_ENV, KEPT_MAX_CHUNKS, NAMESPACE, actor_name, wanted
from schemas.spec import parse_spec


def _spec(corpus, table, model: str, codecs: list[str], kind: str = "embed"):
    return parse_spec({
        "kind": kind, "table": str(table), "model": {"name": model},
        "vectors": {"codecs": codecs},
        "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 10},
        "compute": {"rows_per_batch": 32},
    })


def _vectors(table) -> dict[str, np.ndarray]:
    rows = lance.dataset(str(table)).to_table(columns=["id", "vector"])
    return dict(zip(rows.column("id").to_pylist(),
                    np.asarray(rows.column("vector").to_pylist(), np.float32), strict=True))


def test_small_runs_share_one_loaded_model_and_store_what_the_pool_stores(
        tmp_path, stdlib_docs, tiny_model, ray_local, monkeypatch) -> None:
    import ray

    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:24]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    pooled = run_embed(_spec(corpus, tmp_path / "pool.lance", tiny_model, ["float32"]))
    assert not pooled.profile["actor_kept"]

    def kept_actors() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == NAMESPACE and a["name"].startswith("quiver-embed-")}

    before = kept_actors()
    monkeypatch.setenv(KEEP_ENV, "1")
    first = run_embed(_spec(corpus, tmp_path / "kept.lance", tiny_model, ["float32"]))
    assert not first.profile["actor_kept"]  # this run loaded it
    kept, pool = _vectors(tmp_path / "kept.lance"), _vectors(tmp_path / "pool.lance")
    assert kept.keys() == pool.keys()
    for chunk_id, vector in kept.items():
        np.testing.assert_allclose(vector, pool[chunk_id], atol=1e-5)

    # a reindex and another table (other codecs: another codebook view) reuse the model
    write_jsonl(corpus, [*docs, *({"id": f"new{i}", "text": d["text"]}
                                  for i, d in enumerate(stdlib_docs[30:33]))])
    again = run_embed(_spec(corpus, tmp_path / "kept.lance", tiny_model, ["float32"],
                            kind="reindex"))
    other = run_embed(_spec(corpus, tmp_path / "int8.lance", tiny_model,
                            ["float32", "int8", "binary"]))
    assert again.tokens > 0 and again.profile["actor_kept"] and other.profile["actor_kept"]
    assert again.profile["actor_load"] == first.profile["actor_load"]
    int8 = lance.dataset(str(tmp_path / "int8.lance")).schema
    assert {"vector_i8", "vector_bits"} <= set(int8.names)
    assert int8.field("vector_i8").type == pa.list_(pa.int8(), 32)
    # a run large enough for two one-thread pool actors runs on the same kept actor,
    # with both threads
    more = [{"id": f"more{i}", "text": d["text"]} for i, d in enumerate(stdlib_docs[40:])]
    write_jsonl(corpus, [*docs, *more])
    larger = run_embed(_spec(corpus, tmp_path / "kept.lance", tiny_model, ["float32"],
                             kind="reindex"))
    assert larger.profile["actors"] == 2 and larger.profile["actor_kept"]
    made = kept_actors() - before
    assert len(made) == 1  # four runs, one actor, one model load
    write_jsonl(corpus, [*docs, *({"id": f"new{i}", "text": d["text"]}
                                  for i, d in enumerate(stdlib_docs[30:33]))])
    again = run_embed(_spec(corpus, tmp_path / "kept.lance", tiny_model, ["float32"],
                            kind="reindex"))  # those documents out again

    # its process dies (as the OOM killer would end it): Ray restarts it, the next run
    # embeds on the restarted actor, loading the model again
    actor = ray.get_actor(next(iter(made)), namespace=NAMESPACE)

    def pid() -> int:
        return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()))

    before_kill = pid()
    ray.kill(actor, no_restart=False)
    write_jsonl(corpus, [*docs, *({"id": f"new{i}", "text": d["text"]}
                                  for i, d in enumerate(stdlib_docs[30:35]))])
    after = run_embed(_spec(corpus, tmp_path / "kept.lance", tiny_model, ["float32"],
                            kind="reindex"))
    assert after.reindex["documents"]["added"] == 2 and after.tokens > 0
    assert pid() != before_kill and kept_actors() - before == made
    assert lance.dataset(str(tmp_path / "kept.lance")).count_rows() == \
        after.chunks > again.chunks
    ray.kill(ray.get_actor(made.pop(), namespace=NAMESPACE))  # not left to later tests


def test_only_small_cpu_runs_of_the_warm_scheduler_use_it(monkeypatch) -> None:
    assert not wanted(chunks=10, gpus=0)  # not asked for
    monkeypatch.setenv(KEEP_ENV, "1")
    assert wanted(chunks=KEPT_MAX_CHUNKS, gpus=0)
    assert not wanted(chunks=KEPT_MAX_CHUNKS + 1, gpus=0)
    assert not wanted(chunks=10, gpus=1)


@pytest.mark.parametrize("change", [{"precision": "bf16"}, {"torch_threads": 1}])
def test_another_setting_is_another_actor(model_info, change: dict) -> None:
    settings = {"precision": "fp32", "device": "cpu", "batch_tokens": None,
                "torch_threads": 2, "trust_remote_code": False}
    assert actor_name(model_info, settings) != actor_name(model_info, {**settings, **change})
    assert actor_name(model_info, settings) == actor_name(model_info, dict(settings))
