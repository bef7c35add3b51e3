"""Fitted first-stage codes: a linear projection, then a quantizer, scored asymmetrically.

The papers Quiver started from compress the first stage of a two-stage search: a compact
code picks candidates, the stored float vectors rescore them. Every code here has the
same shape, so one scan serves them all:

- a projection fitted on a sample of the table's vectors: `first` keeps the first dims
  (Matryoshka), `pca` the top principal directions, `rot` PCA then a random rotation
  (which spreads variance evenly, RaBitQ's first step), `itq` PCA then a rotation fitted
  to the sign quantizer (Gong & Lazebnik's iterative quantization), `opq` a rotation
  fitted to product quantization;
- a quantizer: `b1`, `b2`, `b4` keep 1, 2 or 4 bits per projected dimension with levels
  fitted per dimension (1-D Lloyd-Max on the sample), `pq` keeps one byte per
  sub-vector (256 k-means centroids per subspace, product quantization), and `rq` leaves
  the quantizing to Lance: the table stores the projection (float16) and Lance's IVF_RQ
  index keeps 1 bit per projected dimension of each row's residual from its partition
  centre (RaBitQ), searched by Lance, not scanned here. Among 1M distractors at 24 B
  and depth 100, `pca-rq` kept 97.0 / 100.6 / 96.3% of float nDCG@10 on scifact /
  cranfield / limit-small at 50 probes, against 93.0 / 86.0 / 72.4% for the best
  scanned code, `opq-pq` (`benchmarks/codecs.py --lance pca192/IVF_RQ:1 --nprobes 50`).

Scoring is asymmetric: the float query is projected, never quantized, and scores a row
as `project(q) . decode(code)`. That equals `q . x` up to the code's error and a term
that is the same for every row (the projection's centring), so rankings are kept. The
score of one query against n codes is a table lookup per code byte
(`Codec.lookup`), which is what product quantization's asymmetric distance does.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from schemas.records import (
    CODE_PROJECTIONS,
    CODE_QUANTIZERS,
    LANCE_CODE_QUANTIZER,
    lance_indexed_code,
)

PROJECTIONS: tuple[str, ...] = CODE_PROJECTIONS
QUANTIZERS: tuple[str, ...] = CODE_QUANTIZERS
PQ_CENTROIDS = 256
LLOYD_ITERS = 25
ITQ_ITERS = 50
OPQ_ITERS = 10


@dataclass(frozen=True)
class Codec:
    """A fitted code: everything needed to encode rows and score float queries.

    Attributes:
        name: `<projection>-<quantizer>`, for example `pca-b1` or `opq-pq`.
        nbytes: Bytes per encoded vector.
        mean: (dims_in,) the sample mean subtracted before projecting.
        projection: (dims_out, dims_in) orthonormal rows; `x -> projection @ (x - mean)`.
        levels: (dims_out, 2**bits) reconstruction levels per dimension (scalar codes).
        centroids: (subspaces, 256, sub_dims) product-quantization centroids.
    """

    name: str
    nbytes: int
    mean: np.ndarray
    projection: np.ndarray
    levels: np.ndarray | None = None
    centroids: np.ndarray | None = None

    @property
    def bits(self) -> int:
        """Bits per projected dimension of a scalar code (8 per sub-vector for PQ)."""
        return 8 if self.levels is None else int(np.log2(self.levels.shape[1]))

    def project(self, x: np.ndarray) -> np.ndarray:
        """Rows (n, dims_in) in the code's space (n, dims_out), centred."""
        return (np.asarray(x, np.float32) - self.mean) @ self.projection.T

    def query(self, q: np.ndarray) -> np.ndarray:
        """A query in the code's space, not centred: `query(q) . decode(c)` ranks rows
        as `q . x` does (the centring adds `q . mean` to every row alike)."""
        return np.asarray(q, np.float32) @ self.projection.T

    @property
    def lance_indexed(self) -> bool:
        """True when Lance's IVF_RQ index quantizes this code's stored projection."""
        return lance_indexed_code(self.name)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, nbytes) uint8 codes of float rows; for a Lance-indexed code, the
        (n, 8 * nbytes) float16 projection its index is built from."""
        y = self.project(x)
        if self.lance_indexed:
            return y.astype(np.float16)
        if self.centroids is not None:
            return _pq_assign(y, self.centroids)
        return pack(_level_codes(y, self.levels), self.bits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, dims_out) float32 reconstructions in the code's space (centred)."""
        if self.lance_indexed:
            return np.asarray(codes, np.float32)
        codes = np.asarray(codes, np.uint8)
        if self.centroids is not None:
            m = self.centroids.shape[0]
            parts = [self.centroids[j][codes[:, j]] for j in range(m)]
            return np.concatenate(parts, axis=1)
        dims = self.levels.shape[0]
        return self.levels[np.arange(dims), unpack(codes, self.bits, dims)]

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """(nbytes, 256) float32 table: entry [j, b] is what code byte j = b adds to
        the score of the projected query, so `scores = sum_j table[j, codes[:, j]]`."""
        qp = self.query(q)
        if self.centroids is not None:
            return np.einsum("msd,md->ms", self.centroids,
                             qp.reshape(self.centroids.shape[0], -1)).astype(np.float32)
        per = 8 // self.bits
        # every[b, i]: the code of the i-th dimension packed in a byte of value b
        every = unpack(np.arange(256, dtype=np.uint8)[:, None], self.bits, per)
        table = np.zeros((self.nbytes, 256), np.float32)
        for j in range(self.nbytes):
            for i in range(per):
                c = j * per + i
                table[j] += qp[c] * self.levels[c, every[:, i]]
        return table

    def scores(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """`query(q) . decode(code)` of every row, by table lookup (no decoded matrix);
        for a Lance-indexed code, of its stored projection (the exact score the index's
        RaBitQ estimates)."""
        if self.lance_indexed:
            return self.decode(codes) @ self.query(q)
        return lookup_scores(self.lookup(q), codes)

    def to_bytes(self) -> bytes:
        """The fitted arrays as one `.npz` file's bytes (stored with the table)."""
        arrays = {"name": np.array(self.name), "nbytes": np.array(self.nbytes),
                  "mean": self.mean, "projection": self.projection}
        if self.levels is not None:
            arrays["levels"] = self.levels
        if self.centroids is not None:
            arrays["centroids"] = self.centroids
        out = io.BytesIO()
        np.savez(out, **arrays)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, sha256: str | None = None) -> Codec:
        """A codec from `to_bytes`' output, checked against the digest a table's
        manifest recorded for it.

        Raises:
            ValueError: the bytes do not hash to `sha256` (another fit's codebook, or a
                damaged file), or are not a codebook.
        """
        if sha256 is not None and digest(data) != sha256:
            raise ValueError(f"codebook digest {digest(data)[:12]} does not match the "
                             f"table's {sha256[:12]}: it belongs to another fit")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls(str(z["name"]), int(z["nbytes"]), z["mean"], z["projection"],
                           z.get("levels"),
                           z.get("centroids"))
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"not a Quiver codebook: {err}") from None


def digest(data: bytes) -> str:
    """The sha256 a manifest records for a codebook's bytes."""
    return hashlib.sha256(data).hexdigest()


def lookup_scores(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Asymmetric scores of byte codes: `sum_j table[j, codes[:, j]]` for every row.

    One gather per code byte over a column of the codes; a column-major (Fortran-order)
    matrix makes each column contiguous, about twice as fast at 1M rows.

    >>> lookup_scores(np.array([[0.0, 1.0], [10.0, 20.0]], np.float32),
    ...               np.array([[1, 0], [0, 1]], np.uint8))
    array([11., 20.], dtype=float32)
    """
    codes = np.asanyarray(codes, np.uint8)
    out = np.zeros(len(codes), np.float32)
    for j in range(codes.shape[1]):
        out += table[j].take(codes[:, j])
    return out


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(n, d) integer codes below 2**bits as (n, d * bits / 8) bytes, first code in the
    high bits (numpy.packbits' order for 1 bit).

    >>> pack(np.array([[3, 0, 1, 2]]), 2)
    array([[198]], dtype=uint8)
    """
    n, d = codes.shape
    per = 8 // bits
    if d % per:
        raise ValueError(f"{d} dims do not fill whole bytes at {bits} bits each")
    c = codes.astype(np.uint8).reshape(n, d // per, per)
    shifts = (8 - bits * (np.arange(per) + 1)).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=2).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, dims: int) -> np.ndarray:
    """The inverse of `pack`: (n, bytes) to (n, dims) codes.

    >>> unpack(np.array([[198]], np.uint8), 2, 4)
    array([[3, 0, 1, 2]], dtype=uint8)
    """
    per = 8 // bits
    shifts = (8 - bits * (np.arange(per) + 1)).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    out = (packed[:, :, None] >> shifts) & mask
    return out.reshape(len(packed), -1)[:, :dims]


def _level_codes(y: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Nearest level per dimension: thresholds are the midpoints of sorted levels."""
    cuts = (levels[:, 1:] + levels[:, :-1]) / 2  # (d, L-1)
    return (y[:, :, None] > cuts[None]).sum(axis=2).astype(np.uint8)


def fit_levels(y: np.ndarray, bits: int, iters: int = LLOYD_ITERS) -> np.ndarray:
    """Per-dimension Lloyd-Max levels (1-D k-means) of a sample, (d, 2**bits), sorted.

    Started at the quantiles of each dimension, which k-means then moves toward the
    means of the rows they take.
    """
    count = 1 << bits
    qs = (np.arange(count) + 0.5) / count
    levels = np.quantile(y, qs, axis=0).T.astype(np.float32)  # (d, L)
    for _ in range(iters):
        codes = _level_codes(y, levels)
        for level in range(count):
            hit = codes == level
            n = hit.sum(axis=0)
            total = np.where(hit, y, 0.0).sum(axis=0)
            levels[:, level] = np.where(n > 0, total / np.maximum(n, 1), levels[:, level])
        levels.sort(axis=1)
    return levels


def _pq_assign(y: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid per subspace, as one byte each."""
    m, _, sub = centroids.shape
    out = np.empty((len(y), m), np.uint8)
    for j in range(m):
        part = y[:, j * sub:(j + 1) * sub]
        c = centroids[j]
        out[:, j] = np.argmax(part @ c.T - 0.5 * np.einsum("ij,ij->i", c, c), axis=1)
    return out


def _pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top `dims` principal directions (rows) of a sample."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean.astype(np.float32), vt[:dims].astype(np.float32)


def _random_rotation(dims: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dims, dims)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _itq(v: np.ndarray, rng: np.random.Generator, iters: int = ITQ_ITERS) -> np.ndarray:
    """ITQ: the rotation R minimising ||sign(vR) - vR|| (orthogonal Procrustes steps)."""
    rot = _random_rotation(v.shape[1], rng)
    for _ in range(iters):
        b = np.sign(v @ rot)
        u, _, wt = np.linalg.svd(v.T @ b)
        rot = (u @ wt).astype(np.float32)
    return rot


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k centroids of x by faiss' k-means (the maintained implementation)."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(x, np.float32))
    return km.centroids.astype(np.float32)


def _opq(x: np.ndarray, subspaces: int) -> np.ndarray:
    """The OPQ rotation (dims, dims) fitted by faiss for `subspaces` sub-vectors."""
    import faiss

    dims = x.shape[1]
    opq = faiss.OPQMatrix(dims, subspaces)
    # faiss' default 50 alternations took 373 s on 50k rows here; 10 keep most of it
    opq.niter = OPQ_ITERS
    opq.train(np.ascontiguousarray(x, np.float32))
    return faiss.vector_to_array(opq.A).reshape(dims, dims).astype(np.float32)


def budget_dims(quantizer: str, nbytes: int, dims_in: int) -> int | None:
    """Projected dims a quantizer gets from a byte budget; None when it cannot meet it
    (more dims than the vector has, or PQ sub-vectors that do not divide it).

    >>> budget_dims("b1", 24, 384), budget_dims("b4", 24, 384), budget_dims("pq", 24, 384)
    (192, 48, 384)
    >>> budget_dims("b1", 64, 384), budget_dims("pq", 7, 384), budget_dims("rq", 24, 384)
    (None, None, 192)
    """
    if quantizer == "pq":
        return dims_in if dims_in % nbytes == 0 else None
    dims = nbytes * 8 // (1 if quantizer == LANCE_CODE_QUANTIZER else int(quantizer[1:]))
    return dims if dims <= dims_in else None


def fit(sample: np.ndarray, name: str, nbytes: int, *, seed: int = 0) -> Codec:
    """Fit a code named `<projection>-<quantizer>` to `nbytes` per vector on a sample.

    Raises:
        ValueError: an unknown name, a budget the code cannot meet, or a sample with
            fewer rows than the code has parameters to fit.
    """
    projection, _, quantizer = name.partition("-")
    if projection not in PROJECTIONS or quantizer not in QUANTIZERS:
        raise ValueError(f"unknown code {name!r}: use <{'|'.join(PROJECTIONS)}>-"
                         f"<{'|'.join(QUANTIZERS)}>")
    x = np.ascontiguousarray(sample, np.float32)
    dims_in = x.shape[1]
    dims = budget_dims(quantizer, nbytes, dims_in)
    if dims is None:
        raise ValueError(f"{name} cannot spend exactly {nbytes} bytes on {dims_in} dims")
    if quantizer == "pq" and projection not in ("first", "pca", "opq"):
        raise ValueError(f"{name}: product quantization takes first, pca or opq")
    if quantizer != "pq" and projection == "opq":
        raise ValueError(f"{name}: opq is fitted for product quantization only")
    if quantizer == LANCE_CODE_QUANTIZER and projection not in ("first", "pca"):
        raise ValueError(f"{name}: rq takes first or pca (RaBitQ rotates by itself)")
    if len(x) < max(PQ_CENTROIDS if quantizer == "pq" else 2, dims):
        raise ValueError(f"a sample of {len(x)} rows is too small to fit {name}")
    rng = np.random.default_rng(seed)
    if projection == "first":
        mean = np.zeros(dims_in, np.float32)
        proj = np.eye(dims_in, dtype=np.float32)[:dims]
    else:
        mean, proj = _pca(x, dims)
        if projection == "rot":
            proj = _random_rotation(dims, rng).T @ proj
        elif projection == "itq":
            proj = _itq((x - mean) @ proj.T, rng).T @ proj
        elif projection == "opq":
            proj = _opq((x - mean) @ proj.T, nbytes) @ proj
    if quantizer == LANCE_CODE_QUANTIZER:
        return Codec(name, nbytes, mean, proj.astype(np.float32))
    y = (x - mean) @ proj.T
    if quantizer == "pq":
        sub = dims // nbytes
        centroids = np.stack([_kmeans(y[:, j * sub:(j + 1) * sub], PQ_CENTROIDS, seed + j)
                              for j in range(nbytes)])
        return Codec(name, nbytes, mean, proj.astype(np.float32), centroids=centroids)
    levels = fit_levels(y, int(quantizer[1:]))
    return Codec(name, nbytes, mean, proj.astype(np.float32), levels=levels)


def overlap_report(vectors: np.ndarray, old: Codec, new: Codec, *, queries: int = 200,
                   depth: int = 100, k: int = 10, seed: int = 0) -> dict:
    """How a replacement code's first stage compares with the one it replaces, on a
    sample of the table's own float vectors: `queries` of its rows ask, the rest answer.

    For each code, `recall` is the mean share of a query's exact float top `k` among the
    code's top `depth` (what rescoring `depth` candidates can recover); `shared` is the
    mean share of the two codes' top `depth` they have in common. A Lance-indexed code
    is scored by its stored projection, so its index's RaBitQ error is not in its figure.

    >>> x = np.random.default_rng(0).standard_normal((600, 32)).astype(np.float32)
    >>> r = overlap_report(x, fit(x, "pca-b1", 2), fit(x, "pca-b4", 8), queries=20, depth=50)
    >>> r["queries"], r["old"]["recall"] <= r["new"]["recall"], 0 < r["shared"] <= 1
    (20, True, True)
    """
    x = np.ascontiguousarray(vectors, np.float32)
    asking = np.random.default_rng(seed).choice(len(x), min(queries, len(x)), replace=False)
    depth = min(depth, len(x) - 1)
    codes = {"old": old.encode(x), "new": new.encode(x)}
    found = {"old": [], "new": []}
    shared = []
    for i in asking:
        q = x[i]
        exact = x @ q
        exact[i] = -np.inf  # the row is not its own answer
        truth = set(np.argpartition(-exact, k)[:k].tolist())
        tops = {}
        for side, codec in (("old", old), ("new", new)):
            scores = codec.scores(q, codes[side])
            scores[i] = -np.inf
            tops[side] = set(np.argpartition(-scores, depth - 1)[:depth].tolist())
            found[side].append(len(truth & tops[side]) / k)
        shared.append(len(tops["old"] & tops["new"]) / depth)
    return {"rows": len(x), "queries": len(asking), "depth": depth, "k": k,
            **{side: {"code": f"{c.name}@{c.nbytes}",
                      "recall": round(float(np.mean(found[side])), 4),
                      "by_projection": c.lance_indexed}
               for side, c in (("old", old), ("new", new))},
            "shared": round(float(np.mean(shared)), 4)}
