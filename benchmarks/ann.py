"""ANN recall at scale: Quiver's default `vector` index against exact search on 1M vectors.

The collections under ../shared/eval hold about 10,000 chunks, too few to exercise an ANN
index (Quiver searches tables below `IndexSpec.ann_min_rows` exactly). i.i.d. random
vectors are no substitute: in 384 dimensions every point is nearly equidistant from every
other and no index can find neighbours that barely exist. So the set is sampled from a
mixture fitted to real embeddings:

1. the float `vector` column of existing Quiver tables (SciFact and Cranfield by default,
   L2-normalised, 384 dims) is clustered with k-means (`--clusters`, 256 by default);
2. each cluster keeps its centroid, its size, and a low-rank spread: the top `--rank`
   principal components of its members' residuals (with their variances) plus isotropic
   noise carrying the rest of the residual variance, so the total variance matches;
3. each synthetic row picks a cluster with probability proportional to its size, adds a
   residual drawn from that cluster's spread to its centroid, and is L2-normalised.

The rows are written to a Lance table (`id`, `vector`) and indexed exactly as Quiver does
(`operators.index.build_vector_index` with the default `IndexSpec`: IVF_HNSW_SQ, about
sqrt(rows) partitions, dot metric). Held-out queries from the same mixture (another seed)
are searched with Lance's default settings (what `operators.search.VectorSearcher` does
when a query sets no nprobes) and with explicit nprobes; the truth is a numpy brute-force
dot product over all rows.

    python benchmarks/ann.py                          # 1,000,000 rows from scifact+cranfield
    python benchmarks/ann.py --rows 50000             # a quick run
    python benchmarks/ann.py --tables a.lance b.lance --clusters 64
    python benchmarks/ann.py --out /tmp/ann.lance     # keep the synthetic table
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
WAREHOUSE = REPO / "benchmarks" / ".warehouse"
TABLES = (WAREHOUSE / "scifact-windows.lance", WAREHOUSE / "cranfield-windows.lance")
DIMS = 384
K = 10
BLOCK = 50_000
SEED = 20240601


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture with low-rank-plus-isotropic covariances, one per cluster."""

    centroids: np.ndarray
    """(clusters, dims) cluster means (not normalised: the samples are)."""
    weights: np.ndarray
    """(clusters,) probability of each cluster: its share of the real rows."""
    components: np.ndarray
    """(clusters, rank, dims) top principal directions of each cluster's residuals."""
    scales: np.ndarray
    """(clusters, rank) std along each direction beyond the isotropic part."""
    noise: np.ndarray
    """(clusters,) isotropic std per dimension carrying the remaining residual variance."""

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n L2-normalised float32 rows; clusters are drawn by weight."""
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        out = np.empty((n, self.centroids.shape[1]), np.float32)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            z = rng.standard_normal((len(rows), self.scales.shape[1])) * self.scales[c]
            x = self.centroids[c] + z @ self.components[c]
            x += self.noise[c] * rng.standard_normal(x.shape)
            out[rows] = x
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def read_vectors(paths: list[Path]) -> np.ndarray:
    """The float `vector` column of Quiver tables, stacked as one (rows, dims) matrix."""
    import lance

    parts = []
    for p in paths:
        col = lance.dataset(str(p)).to_table(columns=["vector"]).column("vector")
        parts.append(col.combine_chunks().flatten().to_numpy().reshape(-1, DIMS))
        print(f"[ann] {p.name}: {len(parts[-1])} real vectors", flush=True)
    return np.ascontiguousarray(np.vstack(parts), dtype=np.float32)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator,
           iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Plain Lloyd k-means with k-means++ seeding; returns (centroids, labels).

    A few dozen lines of numpy instead of scikit-learn, which Quiver does not depend on.
    Empty clusters are reseeded at the points farthest from their centroids.
    """
    k = min(k, len(x))
    sq = np.einsum("ij,ij->i", x, x)
    centroids = np.empty((k, x.shape[1]), np.float32)
    centroids[0] = x[rng.integers(len(x))]
    d2 = ((x - centroids[0]) ** 2).sum(axis=1)
    for i in range(1, k):
        centroids[i] = x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 \
            else x[rng.integers(len(x))]
        d2 = np.minimum(d2, ((x - centroids[i]) ** 2).sum(axis=1))
    labels = np.zeros(len(x), np.int64)
    for _ in range(iters):
        dist = sq[:, None] - 2 * x @ centroids.T + np.einsum("ij,ij->i", centroids, centroids)
        labels = dist.argmin(axis=1)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            far = np.argsort(-dist[np.arange(len(x)), labels])[: len(empty)]
            sums[empty], counts[empty] = x[far], 1
        new = sums / counts[:, None]
        if np.allclose(new, centroids, atol=1e-6):
            break
        centroids = new.astype(np.float32)
    return centroids, labels


def fit_mixture(x: np.ndarray, clusters: int, rank: int, rng: np.random.Generator) -> Mixture:
    """k-means, then per cluster the top `rank` PCs of the residuals plus isotropic noise.

    Low rank rather than a per-dimension std: real embeddings vary along a few correlated
    directions within a topic, which a diagonal model would spread over all 384 axes. With
    n members a cluster's residuals span at most n-1 directions, so the rank is capped by
    size; clusters of one row borrow the median isotropic std so they are not duplicates.
    """
    centroids, labels = kmeans(x, clusters, rng)
    k, dims = centroids.shape
    counts = np.bincount(labels, minlength=k)
    components = np.zeros((k, rank, dims), np.float32)
    scales = np.zeros((k, rank), np.float32)
    noise = np.full(k, np.nan, np.float32)
    for c in range(k):
        members = x[labels == c]
        if len(members) < 2:
            continue
        resid = members - centroids[c]
        _, s, vt = np.linalg.svd(resid, full_matrices=False)
        var = s**2 / (len(members) - 1)
        r = min(rank, len(var))
        rest = max(float(var.sum() - var[:r].sum()), 0.0) / (dims - r)
        noise[c] = np.sqrt(rest)
        components[c, :r] = vt[:r]
        scales[c, :r] = np.sqrt(np.maximum(var[:r] - rest, 0.0))
    noise[np.isnan(noise)] = np.nanmedian(noise)
    keep = counts > 0
    return Mixture(centroids[keep], counts[keep] / counts[keep].sum(), components[keep],
                   scales[keep], noise[keep])


def batches(mixture: Mixture, rows: int, matrix: np.ndarray,
            rng: np.random.Generator) -> Iterator[pa.RecordBatch]:
    """Sample the table in blocks, filling `matrix` (kept for exact search) as it goes."""
    for start in range(0, rows, BLOCK):
        n = min(BLOCK, rows - start)
        matrix[start:start + n] = mixture.sample(n, rng)
        ids = pa.array([str(i) for i in range(start, start + n)], pa.string())
        vec = pa.FixedSizeListArray.from_arrays(pa.array(matrix[start:start + n].ravel()), DIMS)
        yield pa.RecordBatch.from_arrays([ids, vec], names=["id", "vector"])


def exact_topk(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(queries, k) row numbers of the true top-k by dot product, best first."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(matrix), BLOCK * 4):
        s = queries @ matrix[start:start + BLOCK * 4].T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.hstack([best_s, np.take_along_axis(s, top, 1)])
        best_i = np.hstack([best_i, top + start])
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def similarity_profile(matrix: np.ndarray, queries: np.ndarray,
                       truth: np.ndarray, rng: np.random.Generator) -> tuple[float, ...]:
    """Mean top-1 and top-10 similarity vs similarity to random rows (is there structure?)."""
    sims = np.einsum("qd,qkd->qk", queries, matrix[truth])
    random = queries @ matrix[rng.integers(len(matrix), size=1000)].T
    return float(sims[:, 0].mean()), float(sims.mean()), float(random.mean()), \
        float(np.percentile(random, 99))


def ann_search(ds, queries: np.ndarray, nprobes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Lance's nearest search per query (as VectorSearcher issues it); ids and ms per query."""
    found = np.zeros((len(queries), K), np.int64) - 1
    ms = np.zeros(len(queries))
    for i, q in enumerate(queries):
        nearest: dict = {"column": "vector", "q": q, "k": K, "metric": "dot"}
        if nprobes is not None:
            nearest["nprobes"] = nprobes
        t = time.perf_counter()
        # `_distance` asked for explicitly only to silence Lance's auto-projection warning.
        hits = ds.to_table(nearest=nearest, columns=["id", "_distance"])
        ms[i] = (time.perf_counter() - t) * 1000
        ids = [int(v) for v in hits.column("id").to_pylist()]
        found[i, :len(ids)] = ids
    return found, ms


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k that the ANN search returned."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth,
                                                                      strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", type=Path, default=list(TABLES),
                        help="Quiver tables whose `vector` column the mixture is fitted to.")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8,
                        help="Principal components per cluster beyond isotropic noise.")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--out", type=Path, help="Keep the synthetic Lance table here.")
    args = parser.parse_args()
    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores", flush=True)

    import lance

    from operators.index import build_vector_index
    from schemas.spec import IndexSpec

    real = read_vectors(args.tables)
    t = time.perf_counter()
    mixture = fit_mixture(real, args.clusters, args.rank, np.random.default_rng(SEED))
    print(f"[ann] fitted {len(mixture.weights)} clusters (rank {args.rank} + isotropic) on "
          f"{len(real)} real vectors in {time.perf_counter() - t:.1f} s", flush=True)

    tmp = None if args.out else tempfile.mkdtemp(prefix="quiver-ann-")
    out = args.out or Path(tmp) / "ann.lance"
    try:
        matrix = np.empty((args.rows, DIMS), np.float32)
        schema = pa.schema([("id", pa.string()),
                            ("vector", pa.list_(pa.field("item", pa.float32()), DIMS))])
        t = time.perf_counter()
        reader = pa.RecordBatchReader.from_batches(
            schema, batches(mixture, args.rows, matrix, np.random.default_rng(SEED + 1)))
        ds = lance.write_dataset(reader, str(out), schema=schema, mode="overwrite",
                                 max_rows_per_file=200_000)
        write_s = time.perf_counter() - t
        print(f"[ann] sampled and wrote {args.rows} rows in {write_s:.1f} s", flush=True)

        t = time.perf_counter()
        index = build_vector_index(ds, IndexSpec(), metric="dot", dims=DIMS)
        build_s = time.perf_counter() - t
        print(f"[ann] built {index} in {build_s:.1f} s", flush=True)
        ds = lance.dataset(str(out))

        queries = mixture.sample(args.queries, np.random.default_rng(SEED + 2))
        truth = exact_topk(matrix, queries, K)
        top1, top10, rand, rand99 = similarity_profile(matrix, queries, truth,
                                                       np.random.default_rng(SEED + 3))
        ann_search(ds, queries[:20], None)  # warm the index cache so p99 is not the cold open
        rows = []
        for nprobes in [None, *args.nprobes]:
            found, ms = ann_search(ds, queries, nprobes)
            label = "default (Lance adaptive)" if nprobes is None else f"nprobes={nprobes}"
            rows.append((label, recall(found, truth), *np.percentile(ms, [50, 99])))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"set: {args.rows:,} rows x {DIMS} dims sampled from a {len(mixture.weights)}-cluster "
          f"mixture fitted to {len(real):,} real vectors")
    print(f"     ({', '.join(p.name for p in args.tables)}); L2-normalised; seed {SEED}")
    print(f"     spread per cluster: top {args.rank} PCs of its residuals + isotropic rest")
    print(f"index: {index}; build {build_s:.1f} s (write {write_s:.1f} s)")
    print(f"queries: {args.queries} held out from the same mixture; truth: numpy brute force")
    print(f"structure: mean sim top-1 {top1:.3f}, top-10 {top10:.3f}, random row {rand:.3f} "
          f"(p99 of random {rand99:.3f})")
    print()
    print(f"{'setting':<26}{'recall@10':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for label, r, p50, p99 in rows:
        print(f"{label:<26}{r:>10.3f}{p50:>9.2f}{p99:>9.2f}")


if __name__ == "__main__":
    main()
