"""A change of embedding configuration is never mixed into a table: it is written as new
versions, indexed, and the `current` tag readers follow moves only at the end."""

from __future__ import annotations

import json
from pathlib import Path

import lance
from conftest import write_jsonl

from jobs._embed_job import run_embed
from jobs._tags import CURRENT_TAG, current_version
from jobs.api import open_table
from schemas.manifest import TableManifest
from schemas.spec import parse_spec


def _spec(corpus: Path, table: Path, beir: Path, **chunking):
    return parse_spec({"kind": "embed", "table": str(table),
                       "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 8},
                       "chunking": chunking, "write": {"shards_per_commit": 3,
                                                       "compare_queries": str(beir)}})


def _beir(root: Path, docs: list[dict]) -> Path:
    (root / "qrels").mkdir(parents=True)
    write_jsonl(root / "queries.jsonl",
                [{"_id": f"q{i}", "text": d["text"][:120]} for i, d in enumerate(docs)])
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"q{i}\t{d['id']}\t1\n" for i, d in enumerate(docs)))
    return root


def test_config_change_cuts_over_atomically(tmp_path, stdlib_docs, ray_local) -> None:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[260:284]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    beir = _beir(tmp_path / "beir", docs[:8])
    table = tmp_path / "t.lance"
    run_embed(_spec(corpus, table, beir))
    old_version = current_version(lance.dataset(str(table)))
    assert old_version == lance.dataset(str(table)).version

    summary = run_embed(_spec(corpus, table, beir, max_tokens=64, overlap=8))
    report = summary.cutover
    assert report["from_version"] == old_version and report["to_version"] == summary.version
    # Each query is a document's own text: both configurations find that document, so
    # every query's two top-10 lists share at least it.
    assert report["queries"] == 8 and report["top10_overlap_min"] >= 0.1
    ds = lance.dataset(str(table))
    assert ds.tags.list()[CURRENT_TAG]["version"] == summary.version

    # Every version after the old one holds the new configuration only.
    for v in (x["version"] for x in ds.versions() if x["version"] > old_version):
        snapshot = lance.dataset(str(table), version=v)
        assert TableManifest.from_schema(snapshot.schema).chunking.max_tokens == 64
    assert TableManifest.from_schema(
        lance.dataset(str(table), version=old_version).schema).chunking.max_tokens == 256

    # Readers follow the tag by default; the old model stays readable by version.
    assert open_table(table).manifest.chunking.max_tokens == 64
    old = open_table(table, version=old_version)
    assert old.manifest.chunking.max_tokens == 256
    assert old.search(docs[3]["text"][:200], k=1)[0].doc_id == docs[3]["id"]
    print(json.dumps(report))
