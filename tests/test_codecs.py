"""Fitted first-stage codes on real embeddings: each code's encode, decode and lookup
scoring against a brute-force numpy reference, and the ranking each keeps."""

from __future__ import annotations

import numpy as np
import pytest

from operators.codecs import Codec, budget_dims, digest, fit, lookup_scores, pack, unpack
from operators.quantize import pack_bits, sign_table

CODES = ["first-b1", "pca-b1", "itq-b1", "pca-b2", "rot-b2", "rot-b4", "pca-pq", "opq-pq"]


@pytest.fixture(scope="module")
def vectors(stdlib_vectors) -> np.ndarray:
    """Real all-MiniLM-L6-v2 vectors of standard-library prose (about 500 chunks)."""
    assert len(stdlib_vectors) >= 400, len(stdlib_vectors)
    return stdlib_vectors


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_and_unpack_are_inverse(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(50, 32), dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (50, 32 * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits, 32), codes)
    if bits == 1:  # the order numpy.packbits (and the stored sign bits) use
        np.testing.assert_array_equal(packed, np.packbits(codes, axis=1))


@pytest.mark.parametrize("name", CODES)
def test_each_code_encodes_decodes_and_scores_like_numpy(vectors, name: str) -> None:
    """Codes are the nearest level (scalar) or centroid (PQ) found by brute force; the
    lookup score equals the decoded row dotted with the projected query; and the code's
    first stage finds most of the float top 10 among 100 candidates."""
    nbytes = 24
    held_out = vectors  # PQ's 256 centroids need every row of this small set to fit
    codec = fit(vectors, name, nbytes, seed=1)
    codes = codec.encode(held_out)
    assert codes.shape == (len(held_out), nbytes) and codes.dtype == np.uint8
    y = codec.project(held_out)
    decoded = codec.decode(codes)
    if codec.centroids is not None:
        m, _, sub = codec.centroids.shape
        for j in range(m):
            part = y[:, j * sub:(j + 1) * sub]
            d2 = ((part[:, None, :] - codec.centroids[j][None]) ** 2).sum(axis=2)
            np.testing.assert_allclose(decoded[:, j * sub:(j + 1) * sub],
                                       codec.centroids[j][d2.argmin(axis=1)], atol=1e-5)
    else:
        nearest = np.abs(y[:, :, None] - codec.levels[None]).argmin(axis=2)
        expected = np.take_along_axis(codec.levels[None].repeat(len(y), 0),
                                      nearest[:, :, None], axis=2)[:, :, 0]
        np.testing.assert_allclose(decoded, expected, atol=1e-6)
    recall = []
    for q in held_out[::25]:
        scores = codec.scores(q, codes)
        np.testing.assert_allclose(scores, decoded @ codec.query(q), rtol=1e-4, atol=1e-4)
        truth = set(np.argsort(-(held_out @ q))[:10])
        recall.append(len(truth & set(np.argsort(-scores)[:100])) / 10)
    assert np.mean(recall) >= 0.9, (name, np.mean(recall))


def test_asymmetric_sign_scores_match_the_unpacked_bits(vectors) -> None:
    bits = pack_bits(vectors)
    signs = np.unpackbits(bits, axis=1).astype(np.float32) * 2 - 1
    for q in vectors[::97]:
        np.testing.assert_allclose(lookup_scores(sign_table(q), bits), signs @ q,
                                   rtol=1e-5, atol=1e-4)


def test_budgets_a_code_cannot_meet_are_refused(vectors) -> None:
    assert budget_dims("b4", 48, 384) == 96 and budget_dims("b1", 64, 384) is None
    with pytest.raises(ValueError, match="cannot spend exactly 64 bytes"):
        fit(vectors, "pca-b1", 64)
    with pytest.raises(ValueError, match="unknown code 'pca-b3'"):
        fit(vectors, "pca-b3", 24)
    with pytest.raises(ValueError, match="opq is fitted for product quantization only"):
        fit(vectors, "opq-b1", 24)
    with pytest.raises(ValueError, match="too small"):
        fit(vectors[:100], "pca-pq", 24)
    with pytest.raises(ValueError, match="rq takes first or pca"):
        fit(vectors, "itq-rq", 24)
    with pytest.raises(ValueError, match="cannot spend exactly 64 bytes"):
        fit(vectors, "pca-rq", 64)  # 512 dims of 384


def test_the_spec_refuses_a_lance_indexed_code_on_a_rotation() -> None:
    from schemas.spec import CodeSpec

    assert CodeSpec(name="pca-rq", bytes=24).name == "pca-rq"
    with pytest.raises(ValueError, match="rq takes first or pca"):
        CodeSpec(name="rot-rq", bytes=24)


def test_a_codebook_round_trips_and_a_mismatched_one_is_refused(vectors) -> None:
    codec = fit(vectors, "pca-pq", 16, seed=3)
    data = codec.to_bytes()
    back = Codec.from_bytes(data, sha256=digest(data))
    np.testing.assert_array_equal(back.encode(vectors[:50]), codec.encode(vectors[:50]))
    assert (back.name, back.nbytes) == ("pca-pq", 16)
    other = fit(vectors, "pca-pq", 16, seed=4).to_bytes()
    with pytest.raises(ValueError, match="belongs to another fit"):
        Codec.from_bytes(other, sha256=digest(data))
    with pytest.raises(ValueError, match="not a Quiver codebook"):
        Codec.from_bytes(b"not an npz file")
