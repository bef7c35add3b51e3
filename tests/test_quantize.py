"""Codecs on real embeddings: int8 decode error is bounded by the calibrated step, sign
bits pack and unpack exactly, hamming distances match numpy and Lance, and every search
mode ranks exactly as a numpy brute force over the same stored codes."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from conftest import manifest_for

from operators.embed import Embedder
from operators.quantize import (
    Codebook,
    column_matrix,
    decode_int8,
    encode,
    hamming,
    int8_scores,
    pack_bits,
    to_arrow,
    truncate_query,
)
from operators.search import VectorSearcher
from operators.write import commit, write_fragments
from schemas.errors import QueryError
from schemas.records import table_schema
from schemas.spec import parse_spec

ALL = ["float32", "int8", "binary"]


@pytest.fixture(scope="module")
def chunks(stdlib_chunks) -> pa.Table:
    return stdlib_chunks


@pytest.fixture(scope="module")
def full(stdlib_vectors) -> np.ndarray:
    """Full-size float32 model output for every chunk."""
    return stdlib_vectors


def _book(model_info, full: np.ndarray, codecs=ALL, dims=None) -> tuple[object, Codebook]:
    manifest = manifest_for(model_info, codecs=codecs, dims=dims, sample=full[::3])
    return manifest, Codebook.from_manifest(manifest.vectors, normalize=True)


def test_int8_decode_error_is_within_half_a_step(model_info, full) -> None:
    _, book = _book(model_info, full)
    codes = encode(torch.from_numpy(full), book)["vector_i8"]
    inside = (full >= book.low) & (full <= book.high)
    error = np.abs(decode_int8(codes, book) - full)
    assert inside.mean() > 0.99  # a third of the rows calibrated; most values fall inside
    half_step = np.broadcast_to(book.step / 2, full.shape)
    assert np.all(error[inside] <= half_step[inside] + 1e-6)
    # Out-of-range values clip to the end codes rather than wrapping around.
    assert codes.min() >= -128 and codes.max() <= 127
    np.testing.assert_allclose(int8_scores(full[0], codes, book),
                               decode_int8(codes, book) @ full[0], rtol=1e-4, atol=1e-4)


def test_bits_pack_and_unpack_exactly(model_info, full) -> None:
    _, book = _book(model_info, full)
    bits = encode(torch.from_numpy(full), book)["vector_bits"]
    assert bits.dtype == np.uint8 and bits.shape == (len(full), 384 // 8)
    np.testing.assert_array_equal(bits, pack_bits(full))
    np.testing.assert_array_equal(np.unpackbits(bits, axis=1).astype(bool), full > 0)


def test_hamming_matches_numpy(full) -> None:
    bits = pack_bits(full)
    expected = np.count_nonzero(np.unpackbits(bits ^ bits[7], axis=1), axis=1)
    np.testing.assert_array_equal(hamming(bits[7], bits), expected)


def test_matryoshka_truncation_is_renormalised(model_info, full) -> None:
    _, book = _book(model_info, full, codecs=["float32"], dims=128)
    cut = encode(torch.from_numpy(full), book)["vector"]
    assert cut.shape == (len(full), 128)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    np.testing.assert_allclose(truncate_query(full[3], 128, renormalize=True), expected[3],
                               atol=1e-6)


def test_embedder_stores_only_the_codec_columns(model_info, chunks, full) -> None:
    _, book = _book(model_info, full, codecs=["float16", "binary"])
    out = Embedder(model_info, torch_threads=2, codebook=book)(chunks.slice(0, 20))
    assert "input_ids" not in out.column_names
    assert out.schema.field("vector").type == pa.list_(pa.float16(), 384)
    assert out.schema.field("vector_bits").type == pa.list_(pa.uint8(), 48)
    assert "vector_i8" not in out.column_names
    np.testing.assert_allclose(column_matrix(out.column("vector")).astype(np.float32),
                               full[:20], atol=2e-3)


@pytest.fixture(scope="module")
def coded(tmp_path_factory, model_info, chunks, full) -> tuple[lance.LanceDataset, object]:
    """A table holding float32, int8 and bits of every chunk, with its manifest."""
    manifest, book = _book(model_info, full)
    rows = chunks.drop_columns(["input_ids", "_truncated_tokens"])
    for column, matrix in encode(torch.from_numpy(full), book).items():
        codec = {"vector": "float32", "vector_i8": "int8", "vector_bits": "binary"}[column]
        rows = rows.append_column(column, to_arrow(matrix, codec, 384))
    schema = table_schema(pa.schema([]), dim=384, codecs=ALL).with_metadata(
        manifest.to_metadata())
    path = str(tmp_path_factory.mktemp("coded") / "t.lance")
    ds = commit(path, write_fragments(rows, path, schema=schema), mode="create",
                schema=schema, job="t", shards=["s"])
    return ds, manifest


def test_each_mode_ranks_like_numpy_brute_force(coded, full) -> None:
    ds, manifest = coded
    searcher = VectorSearcher(ds, manifest)
    stored = ds.to_table(columns=["id", "vector", "vector_i8", "vector_bits"])
    ids = np.array(stored.column("id").to_pylist())
    floats = column_matrix(stored.column("vector"))
    codes = column_matrix(stored.column("vector_i8"))
    bits = column_matrix(stored.column("vector_bits"))
    book = searcher.book
    checked = 0
    for q in full[::40]:
        float_scores = floats @ q
        got = searcher.search(q, k=10, using="float", exact=True, columns=("id",))
        np.testing.assert_allclose(got.column("score").to_numpy(),
                                   np.sort(float_scores)[::-1][:10], atol=1e-5)
        assert got.column("id").to_pylist()[:3] == list(ids[np.argsort(-float_scores)[:3]])

        i8 = int8_scores(q, codes, book)
        got = searcher.search(q, k=10, using="int8", rescore=1, columns=("id",))
        np.testing.assert_allclose(got.column("score").to_numpy(),
                                   np.sort(i8)[::-1][:10], atol=1e-4)

        # Binary: the float query against the rows' signs (asymmetric), as a cosine
        # estimate, computed here from the unpacked bits.
        asym = (np.unpackbits(bits, axis=1).astype(np.float32) * 2 - 1) @ q
        got = searcher.search(q, k=10, using="binary", rescore=1, exact=True, columns=("id",))
        expected = np.clip(np.sort(asym)[::-1][:10] * np.sqrt(2 / (np.pi * 384))
                           / np.linalg.norm(q), -1, 1)
        np.testing.assert_allclose(got.column("score").to_numpy(), expected, atol=1e-5)

        # Binary + rescore: the 40 best by the asymmetric score, re-ranked by float dot.
        got = searcher.search(q, k=10, using="binary", rescore=4, exact=True, columns=("id",))
        distance = -asym  # lower is nearer
        cutoff = np.sort(distance)[39]
        pool = np.flatnonzero(distance <= cutoff)  # ties at the cutoff may enter either way
        best = np.sort(float_scores[pool])[::-1][:10]
        assert np.all(got.column("score").to_numpy() <= best[0] + 1e-5)
        assert set(got.column("id").to_pylist()) <= set(ids[pool])
        # A candidate that surely entered (strictly under the cutoff) and that fewer than
        # 10 rows of the whole pool beat by float is in the top 10 whatever ties entered.
        sure = np.flatnonzero(distance < cutoff)
        must = ids[sure[float_scores[sure] > best[min(9, len(best) - 1)]]]
        assert set(must) <= set(got.column("id").to_pylist())
        checked += len(must)
    assert checked >= 10  # the property above was tested, not skipped


def test_binary_search_through_a_hamming_index_keeps_the_best_asymmetric_scores(
        coded, full, tmp_path: Path) -> None:
    """With an IVF hamming index (and no `exact`), the index's BITS_POOL * k nearest by
    hamming are ranked by the float query against their bits, best first."""
    import shutil

    from operators.index import build_bits_index
    from operators.search import BITS_POOL
    from schemas.spec import IndexSpec

    ds, manifest = coded
    copy = tmp_path / "indexed.lance"
    shutil.copytree(ds.uri, copy)
    indexed = lance.dataset(str(copy))
    build_bits_index(indexed, IndexSpec(num_partitions=4))
    indexed = lance.dataset(str(copy))
    searcher = VectorSearcher(indexed, manifest)
    for q in full[::60]:
        pool = indexed.to_table(nearest={"column": "vector_bits", "k": BITS_POOL * 10,
                                         "q": pack_bits(q[None, :])[0], "metric": "hamming"},
                                columns=["id", "vector_bits"])
        bits = column_matrix(pool.column("vector_bits"))
        asym = (np.unpackbits(bits, axis=1).astype(np.float32) * 2 - 1) @ q
        got = searcher.search(q, k=10, using="binary", rescore=1, columns=("id",))
        expected = np.array(pool.column("id").to_pylist())[np.argsort(-asym,
                                                                      kind="stable")[:10]]
        assert got.column("id").to_pylist() == list(expected)
        assert np.all(np.diff(got.column("score").to_numpy()) <= 1e-7)


@pytest.mark.parametrize("using,column", [("int8", "vector_i8"), ("binary", "vector_bits")])
def test_code_scan_streams_a_column_too_big_to_hold(coded, full, using, column) -> None:
    """Past `cache_bytes` each int8 or binary search streams the column in batches and
    keeps nothing; its hits equal those of the held column, filtered or not."""
    import operators.search as search

    ds, manifest = coded
    held = VectorSearcher(ds, manifest)
    streamed = VectorSearcher(ds, manifest, cache_bytes=0)
    where = pc.field("chunk") > 0
    old, search.CODE_SCAN_ROWS = search.CODE_SCAN_ROWS, 7  # many batches on a small table
    try:
        for q in full[::50]:
            for filt in (None, where):
                a = held.search(q, k=10, using=using, rescore=1, exact=True, columns=("id",),
                                where=filt)
                b = streamed.search(q, k=10, using=using, rescore=1, exact=True,
                                    columns=("id",), where=filt)
                assert b.column("id").to_pylist() == a.column("id").to_pylist()
                np.testing.assert_allclose(b.column("score").to_numpy(),
                                           a.column("score").to_numpy(), atol=1e-6)
    finally:
        search.CODE_SCAN_ROWS = old
    assert column in held._held and not streamed._held


def test_modes_the_table_lacks_are_refused(coded, model_info, full, tmp_path: Path) -> None:
    ds, manifest = coded
    searcher = VectorSearcher(ds, manifest)
    with pytest.raises(QueryError, match="unknown vector column choice 'pq'"):
        searcher.search(full[0], k=5, using="pq")
    with pytest.raises(QueryError, match="rescore=0"):
        searcher.search(full[0], k=5, using="binary", rescore=0)
    only_float = manifest.model_copy(update={"vectors": manifest.vectors.model_copy(
        update={"codecs": ["float32"]})})
    with pytest.raises(QueryError, match="cannot search using='binary'"):
        VectorSearcher(ds, only_float).search(full[0], k=5, using="binary")


def test_vector_settings_are_part_of_the_spec_contract() -> None:
    from schemas.errors import SpecError

    base = {"kind": "embed", "table": "t.lance", "source": {"uri": "c", "id_field": "id"}}
    with pytest.raises(SpecError, match="float32 and float16 both fill"):
        parse_spec({**base, "vectors": {"codecs": ["float32", "float16"]}})
    with pytest.raises(SpecError, match="multiple of 8"):
        parse_spec({**base, "vectors": {"codecs": ["binary"], "dims": 100}})
    with pytest.raises(SpecError, match="vectors.codecs"):
        parse_spec({**base, "vectors": {"codecs": ["pq"]}})
