"""A small one-off run's model actor, started while the run plans
(`jobs._embed_service.EarlyEmbedder`): it stores what the actor pool stores, is the
run's only model load, and is gone when the run ends, whether the run embedded on it,
turned out too large for it, or failed."""

from __future__ import annotations

import time

import lance
import numpy as np
import pytest
from conftest import write_jsonl

import jobs._embed_job as embed_job
from jobs._embed_job import run_embed
from jobs._embed_service import (
    EARLY_ENV,
    EARLY_MAX_SOURCE_BYTES,
    KEEP_ENV,
    KEPT_MAX_CHUNKS,
    early_wanted,
)
from schemas.errors import QuiverError
from schemas.spec import parse_spec


def _spec(corpus, table, model: str, kind: str = "embed", **source):
    return parse_spec({
        "kind": kind, "table": str(table), "model": {"name": model},
        "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 10, **source},
        "compute": {"rows_per_batch": 32},
    })


def _vectors(table) -> dict[str, np.ndarray]:
    rows = lance.dataset(str(table)).to_table(columns=["id", "vector"])
    return dict(zip(rows.column("id").to_pylist(),
                    np.asarray(rows.column("vector").to_pylist(), np.float32), strict=True))


def _model_actors() -> set[int]:
    """Processes of this Ray's model actors (kept and early: `KeptEmbedder`); the local
    Ray's workers are this process's descendants."""
    import psutil

    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "KeptEmbedder" in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _live_model_actors(before: set[int], wait_s: float = 30.0) -> set[int]:
    """The model actors started since `before` that are still alive once a killed one
    has had `wait_s` to exit (a killed actor's process ends a moment after)."""
    deadline = time.monotonic() + wait_s
    while (left := _model_actors() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_small_run_embeds_on_the_actor_it_started_while_planning(
        tmp_path, stdlib_docs, tiny_model, ray_local, monkeypatch) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:24]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    pooled = run_embed(_spec(corpus, tmp_path / "pool.lance", tiny_model))
    assert not pooled.profile["actor_early"]
    before = _model_actors()
    monkeypatch.setenv(EARLY_ENV, "1")
    early = run_embed(_spec(corpus, tmp_path / "early.lance", tiny_model))
    assert early.profile["actor_early"] and not early.profile["actor_kept"]
    assert early.model_loads == 1 and early.chunks == pooled.chunks
    mine, pool = _vectors(tmp_path / "early.lance"), _vectors(tmp_path / "pool.lance")
    assert mine.keys() == pool.keys()
    for chunk_id, vector in mine.items():
        np.testing.assert_allclose(vector, pool[chunk_id], atol=1e-5)
    assert not _live_model_actors(before)  # the run ended its actor

    # a reindex starts one too (before its diff says how much changed)
    write_jsonl(corpus, [*docs[2:], *({"id": f"new{i}", "text": d["text"]}
                                      for i, d in enumerate(stdlib_docs[30:33]))])
    again = run_embed(_spec(corpus, tmp_path / "early.lance", tiny_model, kind="reindex"))
    assert again.profile["actor_early"] and again.reindex["documents"]["added"] == 3
    assert again.reindex["documents"]["deleted"] == 2 and again.model_loads == 1
    assert not _live_model_actors(before)


def test_a_run_too_large_for_one_actor_ends_it_and_runs_the_pool(
        tmp_path, stdlib_docs, tiny_model, ray_local, monkeypatch) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:24]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    before = _model_actors()
    monkeypatch.setenv(EARLY_ENV, "1")
    monkeypatch.setattr(embed_job, "KEPT_MAX_CHUNKS", 10)  # 24 documents is "large"
    summary = run_embed(_spec(corpus, tmp_path / "t.lance", tiny_model))
    assert not summary.profile["actor_early"] and summary.documents == 24
    assert lance.dataset(str(tmp_path / "t.lance")).count_rows() == summary.chunks
    assert not _live_model_actors(before)


def test_a_failed_run_ends_its_early_actor(tmp_path, stdlib_docs, tiny_model, ray_local,
                                           monkeypatch) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:10]]
    corpus = write_jsonl(tmp_path / "c.jsonl", [*docs, *({"id": "", "text": "no id"},) * 5])
    before = _model_actors()
    monkeypatch.setenv(EARLY_ENV, "1")
    with pytest.raises(QuiverError, match="reject"):  # 5 of 15 records bad, 10% allowed
        run_embed(_spec(corpus, tmp_path / "t.lance", tiny_model, max_reject_rate=0.1))
    assert not _live_model_actors(before)


def test_only_likely_small_single_node_cpu_runs_start_one_early(monkeypatch) -> None:
    small = dict(nodes=1, gpus=0, device="auto", reindex=False, source_bytes=1 << 20)
    monkeypatch.delenv(EARLY_ENV, raising=False)
    assert early_wanted(**small)
    assert early_wanted(**{**small, "source_bytes": EARLY_MAX_SOURCE_BYTES})
    assert not early_wanted(**{**small, "source_bytes": EARLY_MAX_SOURCE_BYTES + 1})
    assert early_wanted(**{**small, "source_bytes": 1 << 40, "reindex": True})
    assert not early_wanted(**{**small, "source_bytes": 0})  # a size not known
    big = {**small, "source_bytes": 1 << 40}  # a slice of a big source: by its limit
    assert early_wanted(**big, limit=KEPT_MAX_CHUNKS)
    assert not early_wanted(**big, limit=KEPT_MAX_CHUNKS + 1)
    assert not early_wanted(**{**small, "nodes": 2})
    assert not early_wanted(**{**small, "gpus": 1})
    assert not early_wanted(**{**small, "device": "cuda"})
    monkeypatch.setenv(KEEP_ENV, "1")  # the warm scheduler's kept actor is loaded already
    assert not early_wanted(**small)
    monkeypatch.delenv(KEEP_ENV)
    monkeypatch.setenv(EARLY_ENV, "0")
    assert not early_wanted(**small)


def test_a_new_int8_tables_calibration_sample_is_embedded_on_the_early_actor(
        tmp_path, stdlib_docs, tiny_model, ray_local, monkeypatch) -> None:
    """The sample that sets a new table's int8 ranges goes to the actor the run is
    loading anyway, not to a model the driver would load for it, and sets the ranges
    the driver would have set."""
    import jobs._calibrate as calibrate
    from schemas.manifest import TableManifest

    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:24]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)

    def int8_spec(table):
        return parse_spec({"kind": "embed", "table": str(table), "model": {"name": tiny_model},
                           "vectors": {"codecs": ["float32", "int8"],
                                       "calibration_sample": 64},
                           "source": {"uri": str(corpus), "id_field": "id"}})

    run_embed(int8_spec(tmp_path / "driver.lance"))  # the pool's path: the driver embeds
    monkeypatch.setenv(EARLY_ENV, "1")

    def no_driver_model(*args, **kwargs):
        raise AssertionError("the driver loaded a model for the calibration sample")

    monkeypatch.setattr(calibrate, "sample_vectors", no_driver_model)
    summary = run_embed(int8_spec(tmp_path / "early.lance"))
    assert summary.profile["actor_early"] and summary.model_loads == 1

    def ranges(table) -> tuple[list[float], list[float]]:
        vectors = TableManifest.from_schema(lance.dataset(str(table)).schema).vectors
        return vectors.int8_low, vectors.int8_high

    for mine, drivers in zip(ranges(tmp_path / "early.lance"), ranges(tmp_path / "driver.lance"),
                             strict=True):
        np.testing.assert_allclose(mine, drivers, atol=1e-5)


def test_ending_the_early_actor_never_raises_over_the_jobs_own_error(ray_local,
                                                                     capsys) -> None:
    """`EarlyEmbedder.kill` runs in the job's `finally`: a kill Ray refuses is said, not
    raised, and a second call is a no-op."""
    from jobs._embed_service import EarlyEmbedder

    early = EarlyEmbedder()
    early.actor = object()  # not an actor handle: ray.kill refuses it
    early.kill()
    early.kill()
    assert early.actor is None
    assert capsys.readouterr().err.count("could not kill the early model actor") == 1
