"""Incremental reindex on a local Ray: only new and changed chunks are embedded, vanished
ones are deleted, everything lands in one version, and a rerun is a no-op."""

from __future__ import annotations

import json
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
