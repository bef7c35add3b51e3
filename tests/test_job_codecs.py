"""Codecs through the whole job on a local Ray: compact columns written by the actors,
int8 ranges calibrated once and kept by a resumed run, other codec settings refused."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pytest
import torch
from conftest import checkpoint_versions, write_jsonl

from jobs._embed_job import run_embed
from jobs.api import open_table
from operators.quantize import Codebook, column_matrix, encode
from schemas.errors import ManifestMismatchError, QueryError
from schemas.manifest import TableManifest
from schemas.spec import parse_spec

N_DOCS = 36


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_docs) -> Path:
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[40:40 + N_DOCS]]
    return write_jsonl(tmp_path_factory.mktemp("codec-src") / "c.jsonl", docs)


def _spec(corpus: Path, table: Path, vectors: dict, shards_per_commit: int = 1):
    return parse_spec({
        "kind": "embed", "table": str(table), "vectors": vectors,
        "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 12},
        "write": {"shards_per_commit": shards_per_commit, "keep_checkpoints": True},
        "compute": {"rows_per_batch": 64},
    })


def _manifest(path: Path) -> TableManifest:
    return TableManifest.from_schema(lance.dataset(str(path)).schema)


def test_compact_only_table_with_matryoshka_dims(corpus, tmp_path, ray_local, capsys,
                                                 stdlib_docs) -> None:
    path = tmp_path / "compact.lance"
    summary = run_embed(_spec(corpus, path, {"codecs": ["int8", "binary"], "dims": 256},
                              shards_per_commit=3))
    assert "declares no such Matryoshka size" in capsys.readouterr().err
    ds = lance.dataset(str(path))
    names = ds.schema.names
    assert "vector" not in names and "vector_i8" in names and "vector_bits" in names
    assert str(ds.schema.field("vector_i8").type) == "fixed_size_list<item: int8>[256]"
    assert str(ds.schema.field("vector_bits").type) == "fixed_size_list<item: uint8>[32]"
    v = _manifest(path).vectors
    assert v.dims == 256 and v.truncated and len(v.int8_low) == 256
    assert ds.count_rows() == summary.chunks

    table = open_table(path)
    target = stdlib_docs[40 + 5]
    for using in ("auto", "binary", "int8"):
        hits = table.search(target["text"][:400], k=3, using=using)
        assert hits[0].doc_id == target["id"], using
    with pytest.raises(QueryError, match="cannot search using='float'"):
        table.search("x", using="float")


def test_resume_keeps_the_calibration_and_every_row_shares_it(corpus, tmp_path,
                                                              ray_local) -> None:
    path = tmp_path / "resume.lance"
    vectors = {"codecs": ["float32", "int8"], "calibration_sample": 20}
    first = run_embed(_spec(corpus, path, vectors))
    ranges = _manifest(path).vectors
    lance.dataset(str(path), version=checkpoint_versions(path)[0]).restore()  # killed there
    resumed = run_embed(_spec(corpus, path, vectors))
    assert resumed.shards_skipped == 1 and resumed.chunks == first.chunks
    assert _manifest(path).vectors == ranges

    # Rows of both runs are encoded on the one grid the manifest holds.
    rows = lance.dataset(str(path)).to_table(columns=["vector", "vector_i8"])
    floats = column_matrix(rows.column("vector"))
    book = Codebook.from_manifest(ranges, normalize=True)
    expected = encode(torch.from_numpy(np.array(floats)), book)["vector_i8"]
    np.testing.assert_array_equal(column_matrix(rows.column("vector_i8")), expected)

    refuse = _spec(corpus, path, {"codecs": ["float32", "binary"]})
    refuse.write.on_config_change = "refuse"
    with pytest.raises(ManifestMismatchError, match=r"vectors.codecs: table has"):
        run_embed(refuse)
