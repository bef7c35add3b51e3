"""Lance's own compact indices as a first stage, for the ladder and the 1M latency runs.

A stage is named `[<projection><dims>/]<kind>:<n>[:<bits>]`:

- `IVF_PQ:24` is Lance's IVF_PQ with 24 sub-vectors of 8 bits (24 B per row),
  `IVF_PQ:48:4` 48 sub-vectors of 4 bits (24 B);
- `IVF_RQ:1` is Lance's IVF_RQ (RaBitQ on each row's residual from its partition centre)
  with 1 bit per dimension (48 B per row at 384 dims);
- `pca192/IVF_RQ:1` first projects the rows onto their top 192 principal directions
  (fitted on a sample, `operators.codecs.fit`), stores the projection as its own column
  (float16) and builds IVF_RQ on it: 24 B per row, LeanVec's "fitted projection, then
  quantize" done with Lance's index. It is the table code `vectors.code: {name: pca-rq,
  bytes: 24}` (the same fit and column; `benchmarks/first_stage.py --table-code` searches
  the table itself). `first192/…` keeps the first 192 dims instead (`first-rq`), and
  `rot192/…` rotates the PCA projection at random (for IVF_PQ, whose sub-vectors need
  the variance spread evenly).

The index is built on a scratch Lance table with sqrt(rows) partitions (Quiver's rule),
and searched without refine at Quiver's default nprobes (or the one given); the caller
rescores the `depth` rows it returns from the float vectors, which is what
`refine_factor` = depth / k does. A projected stage is built and searched as the table
code is: a quarter of those partitions (`operators.index.code_partitions`), probing
`operators.search.code_nprobes` of them, and Lance's refine on the stored projection
(`CODE_REFINE` times `depth` rows ranked exactly, `depth` kept).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LanceStage:
    """A parsed stage name (see the module docstring)."""

    name: str
    kind: str
    params: dict
    projection: str | None
    dims: int | None

    @classmethod
    def parse(cls, name: str) -> LanceStage:
        head, _, tail = name.rpartition("/")
        kind, *nums = tail.split(":")
        if kind == "IVF_PQ" and 1 <= len(nums) <= 2:
            params = {"num_sub_vectors": int(nums[0]),
                      "num_bits": int(nums[1]) if len(nums) > 1 else 8}
        elif kind == "IVF_RQ" and len(nums) == 1:
            params = {"num_bits": int(nums[0])}
        else:
            raise SystemExit(f"{name}: expected [pca<dims>/|first<dims>/]IVF_PQ:<sub-vectors>"
                             "[:<bits>] or …IVF_RQ:<bits per dimension>")
        projection = dims = None
        if head:
            projection = head.rstrip("0123456789")
            if projection not in ("pca", "first", "rot") or projection == head:
                raise SystemExit(f"{name}: the projection is pca<dims>, rot<dims> or "
                                 "first<dims>")
            dims = int(head[len(projection):])
        return cls(name, kind, params, projection, dims)

    def bytes_per_row(self, dims: int) -> int:
        """Bytes of code per row in the index (row ids and per-row factors aside)."""
        from operators.index import index_bytes_per_row

        return index_bytes_per_row(self.params, self.dims or dims)


class BuiltStage:
    """The stage's index over `rows`, written under `folder`; `top(q, depth)` searches."""

    def __init__(self, stage: LanceStage, rows: np.ndarray, folder: Path, *,
                 fit_sample: np.ndarray | None = None, nprobes: int | None = None) -> None:
        import lance
        import pyarrow as pa

        from operators.codecs import fit
        from operators.index import ann_params, code_partitions
        from operators.search import CODE_REFINE, code_nprobes, default_nprobes

        self.stage = stage
        self.codec = None
        if stage.projection:  # the table code `<projection>-rq` at dims / 8 bytes
            sample = rows if fit_sample is None else fit_sample
            base = "pca" if stage.projection == "rot" else stage.projection
            self.codec = fit(sample, f"{base}-rq", stage.dims // 8)
            if stage.projection == "rot":  # spread PCA's variance over PQ's sub-vectors
                self.codec = _rotated(self.codec)
        column = "p" if self.codec else "vector"
        partitions = code_partitions(len(rows)) if self.codec else None
        self.default_nprobes = code_nprobes(partitions) if self.codec \
            else default_nprobes(len(rows))
        self.nprobes = nprobes or self.default_nprobes
        self.refine = CODE_REFINE if self.codec else None
        uri = str(folder / f"{stage.name.replace('/', '-').replace(':', '-')}.lance")

        def batches():
            for s in range(0, len(rows), 100_000):
                part = rows[s:s + 100_000]
                vec = self.codec.encode(part) if self.codec else part  # float16 if coded
                yield pa.RecordBatch.from_arrays(
                    [pa.array(np.arange(s, s + len(part))),
                     pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), vec.shape[1])],
                    names=["i", column])

        width = stage.dims or rows.shape[1]
        item = pa.float16() if self.codec else pa.float32()
        schema = pa.schema([("i", pa.int64()), (column, pa.list_(item, width))])
        ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), uri,
                                 schema=schema, max_rows_per_file=200_000, mode="overwrite")
        params = ann_params(stage.kind, rows=len(rows), dims=width, num_partitions=partitions,
                            num_sub_vectors=stage.params.get("num_sub_vectors"),
                            num_bits=stage.params.get("num_bits"))
        t = time.perf_counter()
        ds.create_index(column, stage.kind, metric="dot", **params)
        self.build_s = time.perf_counter() - t
        self.ds = lance.dataset(uri)
        self.column = column
        self.index_bytes = sum(f.stat().st_size for f in Path(uri, "_indices").rglob("*")
                               if f.is_file())

    def query(self, q: np.ndarray) -> np.ndarray:
        """The query in the indexed column's space."""
        return self.codec.query(q) if self.codec else np.asarray(q, np.float32)

    def top(self, q: np.ndarray, depth: int) -> np.ndarray:
        """Row numbers of the `depth` best rows by the index's score, best first."""
        hits = self.ds.to_table(nearest={"column": self.column, "q": self.query(q),
                                         "k": depth, "metric": "dot",
                                         "nprobes": self.nprobes,
                                         "refine_factor": self.refine},
                                columns=["i", "_distance"])
        return hits.column("i").to_numpy()


def _rotated(codec):
    """`codec` with a seeded random rotation after its projection: the same dot products
    (so the same refine), but PCA's variance spread evenly over the dims, which product
    quantization's equal sub-vectors need (OPQ's argument; RaBitQ rotates by itself)."""
    import dataclasses

    import numpy as np

    dims = codec.projection.shape[0]
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((dims, dims)))
    rotation = (q * np.sign(np.diag(r))).astype(np.float32)
    return dataclasses.replace(codec, projection=rotation.T @ codec.projection)
