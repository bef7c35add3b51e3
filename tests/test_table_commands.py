"""`quiver table …` through the CLI on real tables (tiny model, local Ray): each command's
effect on the table, and what later jobs do after it (deletes stay out, rollbacks stick).
"""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from jobs._embed_job import run_embed
from jobs._tags import CURRENT_TAG, current_version
from jobs.api import open_table
from jobs.cli import app
from schemas.errors import TableError
from schemas.spec import parse_spec

runner = CliRunner()


def quiver(*args: str) -> dict:
    """Run `quiver ARGS --json` in this process; its one JSON document."""
    result = runner.invoke(app, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _spec(corpus: Path, table: Path, model: str, **write) -> object:
    return parse_spec({
        "kind": "embed", "table": str(table), "model": {"name": model},
        "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 3,
                   "metadata_fields": ["year"]},
        "index": {"filterable": ["year"]},
        "write": {"shards_per_commit": 1, "keep_checkpoints": True, "compact": False,
                  **write}})


@pytest.fixture()
def docs(stdlib_docs) -> list[dict]:
    return [{"id": d["id"], "text": d["text"][:500], "year": 2000 + i % 4}
            for i, d in enumerate(stdlib_docs[100:130])]


@pytest.fixture()
def built(tmp_path, docs, tiny_model, ray_local) -> tuple[Path, Path]:
    """30 documents in 10 shards, one commit each: a table of many small fragments."""
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    run_embed(_spec(corpus, table, tiny_model))
    return corpus, table


def _doc_ids(table: Path) -> set[str]:
    ds = lance.dataset(str(table))
    ds = ds.checkout_version(current_version(ds))  # what readers see
    return set(ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist())


def _top(table: Path, vectors: np.ndarray) -> list[list[tuple[str, float]]]:
    t = open_table(table)
    return [[(h.id, round(h.score, 5)) for h in t.search_vector(v, k=5, exact=True)]
            for v in vectors]


def test_stats_then_optimize_compacts_and_keeps_results(built) -> None:
    _, table = built
    before = quiver("table", "stats", str(table))
    assert before["fragments"] >= 10 and before["small_fragments"] == before["fragments"]
    assert before["optimize_due"] and "small fragments" in before["hint"]
    assert set(before["column_bytes"]) >= {"id", "text", "vector"}
    assert before["column_bytes"]["vector"] > 0 and before["column_bytes"]["text"] > 0
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((5, 32)).astype(np.float32)
    hits = _top(table, queries)

    out = quiver("table", "optimize", str(table), "--retention-days", "0")
    after = out["after"]
    assert after["fragments"] < before["fragments"] and after["fragments"] == 1
    assert after["rows"] == before["rows"] and out["current_moved"]
    assert after["current"] == after["version"] and after["versions"] < before["versions"]
    assert not after["optimize_due"]
    assert _top(table, queries) == hits  # identical results from the compacted version


def test_delete_removes_chunks_in_one_version_and_keeps_them_out(built, docs,
                                                                 tiny_model) -> None:
    corpus, table = built
    gone = docs[4]["id"]
    version = lance.dataset(str(table)).version
    out = quiver("table", "delete", str(table), "--doc-id", gone)
    assert out["documents"] == 1 and out["chunks_deleted"] >= 1
    assert out["version"] == version + 1 and out["current_moved"]
    assert gone not in _doc_ids(table)
    assert open_table(table).search("module", k=30)  # readers see the new version
    assert all(h.doc_id != gone for h in open_table(table).search("module", k=30))

    summary = run_embed(_spec(corpus, table, tiny_model))  # the source still has it
    assert summary.excluded == 1 and summary.documents == len(docs) - 1
    assert gone not in _doc_ids(table) and summary.tokens == 0

    assert quiver("table", "include", str(table), "--doc-id", gone)["removed"] == 1
    back = run_embed(_spec(corpus, table, tiny_model))
    assert back.excluded == 0 and back.reindex["documents"]["added"] == 1
    assert gone in _doc_ids(table)


def test_delete_where_and_allow_return(built, docs, tiny_model) -> None:
    corpus, table = built
    out = quiver("table", "delete", str(table), "--where", "year=2001", "--allow-return")
    want = {d["id"] for d in docs if d["year"] == 2001}
    assert out["documents"] == len(want) and not out["kept_out"]
    assert _doc_ids(table) == {d["id"] for d in docs} - want
    again = run_embed(_spec(corpus, table, tiny_model))  # not excluded: they come back
    assert again.reindex["documents"]["added"] == len(want)
    assert _doc_ids(table) == {d["id"] for d in docs}


def test_export_writes_the_current_rows(built, tmp_path) -> None:
    _, table = built
    out = quiver("table", "export", str(table), str(tmp_path / "t.parquet"),
                 "--columns", "id,doc_id,year")
    parquet = pq.read_table(tmp_path / "t.parquet")
    ds = lance.dataset(str(table))
    assert parquet.column_names == ["id", "doc_id", "year"] == out["columns"]
    assert parquet.num_rows == ds.count_rows() == out["rows"]
    assert sorted(parquet.column("id").to_pylist()) == sorted(
        ds.to_table(columns=["id"]).column("id").to_pylist())


def test_restore_rolls_back_a_cutover_and_sticks_until_promote(built, docs, tiny_model,
                                                               tmp_path) -> None:
    from tiny_model import make_tiny_model

    corpus, table = built
    old_version = current_version(lance.dataset(str(table)))
    other = str(make_tiny_model(tmp_path / "other-model", seed=7))
    run_embed(_spec(corpus, table, other))  # a model cut-over: current moves to it
    new_version = current_version(lance.dataset(str(table)))
    assert new_version != old_version and open_table(table).manifest.model.name == other

    quiver("table", "tag", str(table), "before-fix", str(old_version))
    out = quiver("table", "restore", str(table), "before-fix")
    assert out["current"] == old_version and out["held"]
    t = open_table(table)
    assert t.manifest.model.name == tiny_model  # queries answer with the old model
    assert t.search("binary data", k=3)

    write_jsonl(corpus, [*docs, {"id": "later", "text": "A document added later.",
                                 "year": 2003}])
    run_embed(_spec(corpus, table, other))  # a scheduled reindex on the new model
    ds = lance.dataset(str(table))
    assert current_version(ds) == old_version and ds.version > new_version  # held
    assert quiver("table", "tags", str(table))["held"]

    promoted = quiver("table", "promote", str(table))
    assert promoted["current"] == lance.dataset(str(table)).version and not promoted["held"]
    assert open_table(table).manifest.model.name == other
    assert "later" in _doc_ids(table)
    assert CURRENT_TAG in quiver("table", "tags", str(table))["tags"]


def test_rejects_counts_reasons_and_names_the_line(tmp_path, docs, tiny_model,
                                                   ray_local) -> None:
    lines = [*docs[:6], {"id": docs[0]["id"], "text": "again", "year": 2000},
             {"text": "no id", "year": 2000}, "not json {"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
                      + "\n")
    table = tmp_path / "t.lance"
    run_embed(_spec(corpus, table, tiny_model))
    out = quiver("table", "rejects", str(table), "--limit", "2")
    assert out["rejects"] == 3 and sum(out["by_reason"].values()) == 3
    assert out["by_reason"]["duplicate id"] == 1 and "invalid JSON" in out["by_reason"]
    assert len(out["first"]) == 2
    assert {r["position"] for r in out["first"]} <= {7, 8, 9}
    assert all(r["source"].endswith("c.jsonl") and r["position_kind"] == "line"
               for r in out["first"])
    with pytest.raises(TableError, match="cannot open as a Lance table"):
        quiver("table", "rejects", str(tmp_path / "nope.lance"))


def test_tag_and_include_wait_for_the_lease_like_every_write(built) -> None:
    """A running job holds the table's lease: a tag move or an exclusion-list change in
    the middle of it is refused, naming the holder, and goes through once it is free."""
    from operators.lease import Lease

    _, table = built
    held = Lease.acquire(str(table), purpose="a quiver run of c.jsonl")
    try:
        version = str(lance.dataset(str(table)).version)
        for args in (("tag", str(table), "mine", version),
                     ("include", str(table), "--doc-id", "x")):
            result = runner.invoke(app, ["table", *args, "--json"])
            assert result.exit_code != 0
            said = result.output + str(result.exception or "")
            assert "is being written by another run" in said, said
        assert "mine" not in lance.dataset(str(table)).tags.list()
    finally:
        held.release()
    assert quiver("table", "tag", str(table), "mine", version)["version"] == int(version)
    assert quiver("table", "include", str(table), "--doc-id", "x")["removed"] == 0
