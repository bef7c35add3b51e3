"""Incremental reindex on a local Ray: only new and changed chunks are embedded, vanished
ones are deleted, everything lands in one version, and a rerun is a no-op."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lance
import numpy as np
import pytest
from conftest import chunk_ids, write_jsonl

from jobs._embed_job import run_embed
from operators.quantize import column_matrix
from schemas.errors import TableError
from schemas.spec import parse_spec

N_DOCS = 30


def _spec(corpus: Path, table: Path, **extra):
    return parse_spec({"kind": "embed", "table": str(table),
                       "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 10},
                       "write": {"shards_per_commit": 5, "keep_checkpoints": True}, **extra})


def _vectors(path: Path) -> dict[str, np.ndarray]:
    rows = lance.dataset(str(path)).to_table(columns=["id", "vector"])
    return dict(zip(rows.column("id").to_pylist(), column_matrix(rows.column("vector")),
                    strict=True))


def _addresses(table, version: int, ids: set[str]) -> list[int]:
    """Row addresses, at `version`, of the rows with these ids."""
    rows = lance.dataset(str(table), version=version).to_table(
        columns=["id"], with_row_address=True)
    return [a for i, a in zip(rows.column("id").to_pylist(),
                              rows.column("_rowaddr").to_pylist(), strict=True) if i in ids]


def test_reindex_embeds_only_the_change(tmp_path, stdlib_docs, model_info, ray_local) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[200:200 + N_DOCS]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    first = run_embed(_spec(corpus, table))
    before = _vectors(table)
    v_before = lance.dataset(str(table)).version

    edited = dict(docs[3], text=docs[3]["text"] + " Edited: now about sockets.")
    short = dict(docs[5], text=docs[5]["text"][:200])  # had several chunks, now one
    new = {"id": "brand-new", "text": "A new document about reading CSV files."}
    changed = [*docs[:3], edited, docs[4], short, *docs[6:20], *docs[21:], new]  # 20 gone
    write_jsonl(corpus, changed)
    summary = run_embed(_spec(corpus, table))

    r = summary.reindex
    old_ids = chunk_ids(model_info, docs)
    new_ids = chunk_ids(model_info, changed)
    assert sorted(lance.dataset(str(table)).to_table(columns=["id"]).column("id")
                  .to_pylist()) == new_ids
    gone = set(old_ids) - set(new_ids)
    assert r["deleted"] == len(gone) and r["added"] == len(set(new_ids) - set(old_ids))
    touched = [c for c in old_ids if c.split("#")[0] in (docs[3]["id"], docs[5]["id"])]
    assert 2 <= r["changed"] <= len(touched)  # only chunks of the edited documents
    assert r["embedded"] == r["added"] + r["changed"]
    assert r["unchanged"] == len(new_ids) - r["added"] - r["changed"]
    assert summary.tokens < first.tokens / 5
    # the removed rows' deletion vectors were written by cluster tasks, not the driver
    fragments = len({f >> 32 for f in _addresses(table, v_before, gone | set(touched))})
    assert 1 <= r["deletion_tasks"] <= fragments

    after = _vectors(table)
    untouched = [c for c in new_ids if c in before and not c.startswith((docs[3]["id"] + "#",
                                                                         docs[5]["id"] + "#"))]
    assert untouched and all(np.array_equal(after[c], before[c]) for c in untouched)
    assert not np.allclose(after[f"{docs[3]['id']}#0"], before[f"{docs[3]['id']}#0"])

    # One data version between the two states: readers never see a half-applied reindex.
    mid = lance.dataset(str(table), version=v_before + 1)
    assert sorted(mid.to_table(columns=["id"]).column("id").to_pylist()) == new_ids

    again = run_embed(_spec(corpus, table))
    assert again.tokens == 0 and again.shards_skipped == again.shards


def test_other_source_needs_kind_reindex(tmp_path, stdlib_docs, ray_local) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[240:246]]
    a = write_jsonl(tmp_path / "a.jsonl", docs)
    b = write_jsonl(tmp_path / "b.jsonl", docs[:4])
    table = tmp_path / "t.lance"
    run_embed(_spec(a, table))
    with pytest.raises(TableError, match="kind: reindex"):
        run_embed(_spec(b, table))
    spec = _spec(b, table)
    spec.kind = "reindex"
    summary = run_embed(spec)
    assert summary.reindex["embedded"] == 0 and summary.reindex["deleted"] >= 2
    assert {i.split("#")[0] for i in lance.dataset(str(table)).to_table(columns=["id"])
            .column("id").to_pylist()} == {d["id"] for d in docs[:4]}
    print(json.dumps(summary.reindex))


# ---------------------------------------------------------------- with the tiny model


def _tiny_spec(corpus: Path, table: Path, model: str, **write) -> dict:
    return {"kind": "embed", "table": str(table), "model": {"name": model},
            "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 10},
            "write": {"keep_checkpoints": True, **write}}


def _rows(path: Path, columns: list[str]) -> dict[str, dict]:
    t = lance.dataset(str(path)).to_table(columns=["id", *columns])
    return {r["id"]: r for r in t.to_pylist()}


@pytest.fixture()
def yearly(tmp_path, stdlib_docs) -> list[dict]:
    return [{"id": d["id"], "text": d["text"][:600], "year": 2000 + i % 5}
            for i, d in enumerate(stdlib_docs[300:330])]


def test_metadata_only_edit_rewrites_rows_and_embeds_nothing(tmp_path, yearly, tiny_model,
                                                            ray_local) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", yearly)
    table = tmp_path / "t.lance"
    run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    before = _rows(table, ["year", "vector"])
    edited = [dict(d, year=1999) if i in (2, 7) else d for i, d in enumerate(yearly)]
    write_jsonl(corpus, edited)
    summary = run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    r = summary.reindex
    assert r["documents"] == {"added": 0, "changed": 2, "deleted": 0}
    assert r["embedded"] == 0 and summary.tokens == 0 and summary.model_loads == 0
    moved = [c for c in before if c.split("#")[0] in (yearly[2]["id"], yearly[7]["id"])]
    assert r["carried"] == len(moved) and r["unchanged"] == len(before)
    after = _rows(table, ["year", "vector"])
    assert after.keys() == before.keys()
    want = {d["id"]: d["year"] for d in edited}
    assert all(row["year"] == want[cid.split("#")[0]] for cid, row in after.items())
    assert all(after[c]["vector"] == before[c]["vector"] for c in before)  # bit-identical


def test_unchanged_source_rewritten_costs_no_model_no_commit(tmp_path, yearly, tiny_model,
                                                              ray_local) -> None:
    """A nightly export rewrites the files with the same content: the job fingerprint
    (sizes, mtimes) differs, the documents do not. No model loads, no commit, no index."""
    corpus = write_jsonl(tmp_path / "c.jsonl", yearly)
    table = tmp_path / "t.lance"
    run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    version = lance.dataset(str(table)).version
    time.sleep(0.01)
    write_jsonl(corpus, yearly)
    os.utime(corpus)
    summary = run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    assert summary.model_loads == 0 and summary.commits == 0 and summary.tokens == 0
    assert summary.index == "unchanged" and summary.reindex["embedded"] == 0
    assert lance.dataset(str(table)).version == version


@pytest.mark.heavy  # CI's 30 minutes: a legacy-table migration, in `make test-heavy`
def test_reindex_of_a_table_without_doc_hashes_embeds_nothing(tmp_path, yearly, tiny_model,
                                                              ray_local) -> None:
    """A table written before `doc_hash` existed: the column is added, every document is
    matched chunk by chunk once, and no vector is recomputed; the next reindex is cheap."""
    corpus = write_jsonl(tmp_path / "c.jsonl", yearly)
    table = tmp_path / "t.lance"
    run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    lance.dataset(str(table)).drop_columns(["doc_hash"])  # the old layout
    before = _rows(table, ["vector"])
    edited = [dict(d, text=d["text"] + " Edited.") if i == 4 else d
              for i, d in enumerate(yearly)]
    write_jsonl(corpus, edited)
    summary = run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    r = summary.reindex
    assert r["documents"]["changed"] == len(yearly)  # every hash was unknown
    assert 1 <= r["embedded"] <= 3  # only the edited document's changed chunks
    after = _rows(table, ["vector", "doc_hash"])
    assert all(row["doc_hash"] is not None for row in after.values())
    kept = [c for c in before if not c.startswith(yearly[4]["id"] + "#")]
    assert all(after[c]["vector"] == before[c]["vector"] for c in kept)
    again = [dict(d, year=1900) if i == 0 else d for i, d in enumerate(edited)]
    write_jsonl(corpus, again)
    assert run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model))) \
        .reindex["documents"]["changed"] == 1


def test_schema_changes_refused_or_evolved(tmp_path, yearly, tiny_model, ray_local) -> None:
    from schemas.errors import SchemaChangeError

    corpus = write_jsonl(tmp_path / "c.jsonl", yearly)
    table = tmp_path / "t.lance"
    run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    version = lance.dataset(str(table)).version
    # A new field: refused by default, naming it; evolved on request.
    tagged = [dict(d, lang="en") if i < 3 else d for i, d in enumerate(yearly)]
    write_jsonl(corpus, tagged)
    with pytest.raises(SchemaChangeError, match=r"new field 'lang' \(string\)"):
        run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    assert lance.dataset(str(table)).version == version  # nothing was written
    summary = run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model,
                                              on_schema_change="evolve")))
    assert summary.reindex["schema_change"] == {"added": {"lang": "string"}, "kept": {}}
    assert summary.reindex["documents"]["changed"] == 3 and summary.reindex["embedded"] == 0
    langs = {r["doc_id"]: r["lang"] for r in lance.dataset(str(table))
             .to_table(columns=["doc_id", "lang"]).to_pylist()}
    assert {k for k, v in langs.items() if v == "en"} == {d["id"] for d in yearly[:3]}
    # A field gone: its column stays, null for the documents that changed.
    dropped = [{k: v for k, v in d.items() if k != "year"} for d in tagged]
    write_jsonl(corpus, dropped)
    with pytest.raises(SchemaChangeError, match=r"field 'year' \(int64\) no longer"):
        run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    summary = run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model,
                                              on_schema_change="evolve")))
    assert summary.reindex["schema_change"]["kept"] == {"year": "int64"}
    years = lance.dataset(str(table)).to_table(columns=["year"]).column("year")
    assert years.null_count == len(years)  # every document had a year: all changed
    # A new type: refused either way.
    retyped = [dict(d, lang=1.5) if i < 3 else d for i, d in enumerate(dropped)]
    write_jsonl(corpus, retyped)
    for mode in ("refuse", "evolve"):
        with pytest.raises(SchemaChangeError, match=r"'lang' is string in the table and "
                                                    r"double in the source"):
            run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model,
                                            on_schema_change=mode)))


def test_reindex_killed_then_rerun_equals_a_fresh_build(tmp_path, yearly, tiny_model,
                                                        ray_local) -> None:
    """Text edits, metadata edits, deletions and additions at once; the reindex is killed
    after its chunk diff (kept rows already written, nothing committed), then run again.
    The table then equals a fresh full build of the new source, and the kill left the
    old version in place for readers."""
    import signal
    import subprocess
    import sys

    from conftest import REPO

    corpus = write_jsonl(tmp_path / "c.jsonl", yearly)
    table = tmp_path / "t.lance"
    run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    before = lance.dataset(str(table))
    new = [dict(d, text=d["text"] + " Edited.") if i in (1, 2) else
           dict(d, year=1990) if i in (3, 4) else d
           for i, d in enumerate(yearly) if i not in (5, 6)]
    new += [{"id": "fresh-1", "text": "A new document about queues.", "year": 2024},
            {"id": "fresh-2", "text": "Another one, about sockets.", "year": 2024}]
    write_jsonl(corpus, new)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_tiny_spec(corpus, table, tiny_model)))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed = False
    for line in proc.stderr:
        if line.startswith("[quiver] reindex:"):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(60)
    assert killed, "the reindex ended before it could be killed"
    assert lance.dataset(str(table)).version == before.version  # readers: the old table
    summary = run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    assert summary.reindex["documents"] == {"added": 2, "changed": 4, "deleted": 2}
    fresh = tmp_path / "fresh.lance"
    run_embed(parse_spec(_tiny_spec(corpus, fresh, tiny_model)))
    columns = ["doc_id", "text", "year", "content_hash", "doc_hash"]
    got, want = _rows(table, [*columns, "vector"]), _rows(fresh, [*columns, "vector"])
    assert got.keys() == want.keys()
    for cid, row in want.items():
        assert {c: got[cid][c] for c in columns} == {c: row[c] for c in columns}, cid
        assert np.allclose(got[cid]["vector"], row["vector"], atol=1e-5), cid
    # Exactly the edited documents' changed chunks and the new ones were embedded.
    old_hashes = {r["id"]: r["content_hash"] for r in before.to_table(
        columns=["id", "content_hash"]).to_pylist()}
    expected = [c for c, row in want.items() if old_hashes.get(c) != row["content_hash"]]
    assert summary.reindex["embedded"] == len(expected) >= 4


@pytest.mark.parametrize("manifest_version", [3, pytest.param(2, marks=pytest.mark.heavy)])
def test_precision_is_recorded_not_compared(tmp_path, yearly, tiny_model, ray_local,
                                            monkeypatch, manifest_version) -> None:
    """A table built in bf16 (what `auto` gives on a CPU with AVX-512 BF16), rerun from a
    machine that runs fp32: the same configuration, so a reindex, not a cut-over, and
    only the edited document's chunks are embedded. Version 2 is a table written before
    precision left the fingerprint (its chunk hashes include it): compared in the form it
    was written in, it embeds nothing more either."""
    import jobs._embed_job as embed_job
    from schemas.manifest import TableManifest

    built = embed_job.build_manifest
    with monkeypatch.context() as patch:  # the build writes a manifest of that version
        patch.setattr(embed_job, "build_manifest", lambda *a, **k: built(*a, **k).model_copy(
            update={"schema_version": manifest_version}))
        long = dict(yearly[4], text="alpha " + " ".join(d["text"] for d in yearly[:12]))
        docs = [long if i == 4 else d for i, d in enumerate(yearly)]
        corpus = write_jsonl(tmp_path / "c.jsonl", docs)
        table = tmp_path / "t.lance"
        run_embed(parse_spec({**_tiny_spec(corpus, table, tiny_model),
                              "model": {"name": tiny_model, "precision": "bf16"}}))
    before = TableManifest.from_schema(lance.dataset(str(table)).schema)
    assert (before.schema_version, before.model.precision) == (manifest_version, "bf16")
    chunks = len([c for c in _rows(table, []) if c.startswith(long["id"] + "#")])
    assert chunks >= 5
    edited = [dict(d, text="gamma" + d["text"][len("alpha"):]) if i == 4 else d
              for i, d in enumerate(docs)]  # one token of the first window
    write_jsonl(corpus, edited)
    fp32 = parse_spec({**_tiny_spec(corpus, table, tiny_model),
                       "model": {"name": tiny_model, "precision": "fp32"}})
    summary = run_embed(fp32)
    assert summary.cutover is None and summary.reindex is not None
    assert summary.reindex["documents"] == {"added": 0, "changed": 1, "deleted": 0}
    assert summary.reindex["embedded"] == 1 < chunks  # that window, no other
    after = TableManifest.from_schema(lance.dataset(str(table)).schema)
    assert after.embedding_fingerprint() == before.embedding_fingerprint()
    again = run_embed(fp32)
    assert again.model_loads == 0 and again.commits == 0 and again.tokens == 0


def test_overwrite_replaces_a_table_of_another_layout(tmp_path, yearly, tiny_model,
                                                      ray_local) -> None:
    """`write.mode: overwrite` over a table whose schema differs (here one written before
    `doc_hash` existed, as `make demo` found on a machine that had run an older Quiver):
    the new fragments are written against the new schema, not checked against the old
    table's, and the table is replaced whole."""
    corpus = write_jsonl(tmp_path / "c.jsonl", yearly)
    table = tmp_path / "t.lance"
    run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model)))
    before = sorted(_rows(table, []))
    lance.dataset(str(table)).drop_columns(["doc_hash"])  # the old layout
    summary = run_embed(parse_spec(_tiny_spec(corpus, table, tiny_model, mode="overwrite")))
    ds = lance.dataset(str(table))
    assert "doc_hash" in ds.schema.names and summary.chunks == len(before)
    assert sorted(_rows(table, ["doc_hash"])) == before
    assert all(r["doc_hash"] is not None for r in _rows(table, ["doc_hash"]).values())
