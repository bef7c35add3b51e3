"""First stages at 1M vectors: latency and memory of a compact code plus rescoring,
against the float IVF_HNSW_SQ index Quiver builds by default.

The rows are `benchmarks/ann.py`'s: 1M × 384 vectors sampled from a mixture fitted to the
real scifact and cranfield chunk vectors, written to a Lance table (`id`, `vector`) with
Quiver's default ANN index (kept under benchmarks/.warehouse and reused). Queries are held
out from the same mixture; the truth is a numpy brute force.

Ways, each one query at a time as a server runs them:
- `float IVF_HNSW_SQ`: Lance's nearest search with Quiver's default nprobes;
- `<code> + rescore N`: the code held in memory (column-major, as `VectorSearcher` holds
  the sign bits), scanned with the float query (`operators.codecs.lookup_scores`), the
  best N rows fetched by row id from Lance and rescored with their float vectors.

- `lance <stage>` (`--lance`, names as in `benchmarks/lance_stage.py`): Lance's own
  compact index on a copy of the rows. `IVF_RQ:1` and `IVF_PQ:24` are searched as Quiver
  searches a table with that `index.ann_type`: one Lance call with `refine_factor` =
  depth / 10, the float vectors of the same table rescoring. `pca192/IVF_RQ:1` indexes a
  fitted 192-d projection (24 B per row) in its own table; its `depth` best rows are
  fetched by row id from the float table and rescored, as the code ways are.

- `table <code>` (`--table-code pca-rq@24`): a Quiver table with that fitted code
  (`vectors.code`), its `vector_code` column and Lance index built as a job builds them
  (`operators.index.build_code_index`), searched through `VectorSearcher` with
  `using="code"` and `depth` candidates rescored from the float column: the whole
  server-side path, at each `--nprobes`.

For each: recall@10 against the exact top 10, p50 and p99 milliseconds, and the memory
the first stage holds (codes only; the float index's is its partitions and SQ codes; a
Lance index's is its files: codes, row ids and per-row factors).

    python benchmarks/first_stage.py                 # 1M rows, 200 queries
    python benchmarks/first_stage.py --rows 100000   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from ann import (  # noqa: E402
    DIMS,
    SEED,
    TABLES,
    WAREHOUSE,
    batches,
    exact_topk,
    fit_mixture,
    read_vectors,
    recall,
)
from lance_stage import LanceStage  # noqa: E402

CODES = (("sign bits (asymmetric)", None, 48), ("pca-b1", "pca-b1", 24),
         ("opq-pq", "opq-pq", 24))
LANCE_STAGES = ("IVF_RQ:1", "IVF_PQ:24", "pca192/IVF_RQ:1")
FIT_SAMPLE = 50_000


def table(rows: int, matrix: np.ndarray, mixture) -> object:
    """The synthetic table with its float index, built once per row count and reused."""
    import lance
    import pyarrow as pa

    from operators.index import build_vector_index
    from schemas.spec import IndexSpec

    out = WAREHOUSE / f"first-stage-{rows}.lance"
    sample = np.random.default_rng(SEED + 1)
    if out.is_dir() and lance.dataset(str(out)).list_indices():
        for start in range(0, rows, 50_000):  # the same rows, regenerated for the truth
            n = min(50_000, rows - start)
            matrix[start:start + n] = mixture.sample(n, sample)
        print(f"[first-stage] reusing {out}", flush=True)
        return lance.dataset(str(out))
    schema = pa.schema([("id", pa.string()),
                        ("vector", pa.list_(pa.field("item", pa.float32()), DIMS))])
    reader = pa.RecordBatchReader.from_batches(schema, batches(mixture, rows, matrix, sample))
    ds = lance.write_dataset(reader, str(out), schema=schema, mode="overwrite",
                             max_rows_per_file=200_000)
    t = time.perf_counter()
    index = build_vector_index(ds, IndexSpec(), metric="dot", dims=DIMS)
    print(f"[first-stage] built {index} in {time.perf_counter() - t:.1f} s", flush=True)
    return lance.dataset(str(out))


def lance_ways(stage, ds, row_ids: np.ndarray, matrix: np.ndarray, queries: np.ndarray,
               truth: np.ndarray, depths: list[int]) -> list[tuple]:
    """`stage` built on a scratch copy of the rows; one result row per rescoring depth."""
    import tempfile

    from lance_stage import BuiltStage

    from operators.quantize import column_matrix

    out = []
    with tempfile.TemporaryDirectory(prefix="quiver-first-stage-",
                                     dir=WAREHOUSE) as tmp:
        built = BuiltStage(stage, matrix, Path(tmp),
                           fit_sample=matrix[np.random.default_rng(SEED + 4).choice(
                               len(matrix), min(FIT_SAMPLE, len(matrix)), replace=False)])
        for depth in depths:
            found = np.zeros((len(queries), 10), np.int64) - 1
            for _warm in (True, False):  # the first pass warms the index cache
                ms = []
                for i, q in enumerate(queries):
                    t = time.perf_counter()
                    if built.codec is None:  # as Quiver searches: Lance refines itself
                        hits = built.ds.to_table(nearest={
                            "column": "vector", "q": q, "k": 10, "metric": "dot",
                            "nprobes": built.nprobes, "refine_factor": depth // 10},
                            columns=["i", "_distance"])
                        found[i, :hits.num_rows] = hits.column("i").to_numpy()
                    else:
                        top = built.top(q, depth)
                        rows = ds._take_rows(row_ids[top].tolist(), columns=["vector"])
                        exact = column_matrix(rows.column("vector")) @ q
                        found[i] = top[np.argsort(-exact)[:10]]
                    ms.append((time.perf_counter() - t) * 1000)
            out.append((f"lance {stage.name} + rescore {depth}",
                        f"{stage.bytes_per_row(DIMS)} B codes; built in {built.build_s:.0f} s",
                        built.index_bytes, recall(found, truth), *np.percentile(ms, [50, 99])))
    return out


def table_code_ways(code: str, rows: int, matrix: np.ndarray, queries: np.ndarray,
                    truth: np.ndarray, depths: list[int], probes: list[int],
                    refines: list[int]) -> list[tuple]:
    """A Quiver table with the fitted code `NAME@BYTES` (built once, reused) searched
    through `VectorSearcher`, one result row per nprobes, refine and depth."""
    import lance
    import pyarrow as pa

    from jobs._embed_job import build_manifest
    from operators.codecs import fit
    from operators.index import build_code_index
    from operators.model import describe_model
    from operators.quantize import fixed_size_list
    from operators.search import CODE_REFINE, VectorSearcher
    from schemas.manifest import CodeManifest
    from schemas.records import code_field
    from schemas.spec import IndexSpec, ModelSpec, parse_spec

    name, _, nbytes = code.partition("@")
    out_uri = WAREHOUSE / f"first-stage-{rows}-{name}-{nbytes}.lance"
    codec = fit(matrix[np.random.default_rng(SEED + 4).choice(
        len(matrix), min(FIT_SAMPLE, len(matrix)), replace=False)], name, int(nbytes),
        seed=SEED)
    field = code_field(name, int(nbytes))
    manifest = build_manifest(parse_spec({"kind": "embed", "table": str(out_uri),
                                          "source": {"uri": "x.jsonl", "id_field": "id"}}),
                              describe_model(ModelSpec()), precision="fp32")
    meta = CodeManifest(name=name, nbytes=int(nbytes), sha256="benchmark",
                        sample_rows=FIT_SAMPLE)
    manifest = manifest.model_copy(update={"vectors": manifest.vectors.model_copy(
        update={"code": meta})})
    t = time.perf_counter()
    if not (out_uri.is_dir() and lance.dataset(str(out_uri)).list_indices()):
        schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), DIMS)),
                            field])

        def parts():
            for s in range(0, rows, 100_000):
                part = matrix[s:s + 100_000]
                yield pa.RecordBatch.from_arrays(
                    [pa.array([str(i) for i in range(s, s + len(part))]),
                     fixed_size_list(part, schema.field("vector").type),
                     fixed_size_list(codec.encode(part), field.type)], schema=schema)

        ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, parts()),
                                 str(out_uri), schema=schema, mode="overwrite",
                                 max_rows_per_file=200_000)
        print(f"[first-stage] {build_code_index(ds, IndexSpec(), meta)}", flush=True)
    built_s = time.perf_counter() - t
    ds = lance.dataset(str(out_uri))
    index_bytes = sum(f.stat().st_size for f in Path(out_uri, "_indices").rglob("*")
                      if f.is_file())
    searcher = VectorSearcher(ds, manifest, code=lambda: codec)
    results = []
    configs = [(p, r, d) for p in probes or [searcher.code_probes()]
               for r in refines or [CODE_REFINE] for d in depths]
    for nprobes, refine, depth in configs:
        found = np.zeros((len(queries), 10), np.int64) - 1
        for _warm in (True, False):
            ms = []
            for i, q in enumerate(queries):
                t = time.perf_counter()
                hits = searcher.search(q, k=10, using="code", depth=depth, nprobes=nprobes,
                                       refine_factor=refine, columns=("id",))
                ms.append((time.perf_counter() - t) * 1000)
                found[i, :hits.num_rows] = [int(v) for v in hits.column("id").to_pylist()]
        results.append((f"table {name}@{nbytes} + rescore {depth}, nprobes {nprobes}, "
                        f"refine {refine}", f"written and indexed in {built_s:.0f} s",
                        index_bytes, recall(found, truth), *np.percentile(ms, [50, 99])))
        print(f"[first-stage] {results[-1]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rescore", type=int, nargs="+", default=[100])
    parser.add_argument("--codes", nargs="*", default=[c[0] for c in CODES],
                        help="which numpy-scanned codes to run (labels as printed)")
    parser.add_argument("--lance", nargs="*", default=list(LANCE_STAGES),
                        help="Lance index first stages (benchmarks/lance_stage.py names)")
    parser.add_argument("--table-code", nargs="*", default=[],
                        help="fitted table codes NAME@BYTES searched as a Quiver table is "
                        "(pca-rq@24)")
    parser.add_argument("--refine", type=int, nargs="*", default=[],
                        help="Lance refine factors for --table-code (default: CODE_REFINE)")
    parser.add_argument("--nprobes", type=int, nargs="*", default=[],
                        help="IVF probes for --table-code (default: the table's, "
                        "operators.search.code_nprobes of its partitions)")
    args = parser.parse_args()

    from operators.codecs import fit, lookup_scores
    from operators.embed import cpu_kind
    from operators.quantize import column_matrix, pack_bits, sign_table
    from operators.search import default_nprobes

    print(f"CPU: {cpu_kind()}", flush=True)
    WAREHOUSE.mkdir(parents=True, exist_ok=True)
    real = read_vectors(list(TABLES))
    mixture = fit_mixture(real, 256, 8, np.random.default_rng(SEED))
    matrix = np.empty((args.rows, DIMS), np.float32)
    ds = table(args.rows, matrix, mixture)
    row_ids = ds.to_table(columns=[], with_row_id=True).column("_rowid").to_numpy()
    queries = mixture.sample(args.queries, np.random.default_rng(SEED + 2))
    truth = exact_topk(matrix, queries, 10)
    results = []

    nprobes = default_nprobes(args.rows)
    found, ms = np.zeros((len(queries), 10), np.int64) - 1, []
    for warm in (True, False):
        ms = []
        for i, q in enumerate(queries):
            t = time.perf_counter()
            hits = ds.to_table(nearest={"column": "vector", "q": q, "k": 10, "metric": "dot",
                                        "nprobes": nprobes}, columns=["id", "_distance"])
            ms.append((time.perf_counter() - t) * 1000)
            found[i, :hits.num_rows] = [int(v) for v in hits.column("id").to_pylist()]
        if not warm:
            results.append(("float IVF_HNSW_SQ", f"nprobes {nprobes}", 0, recall(found, truth),
                            *np.percentile(ms, [50, 99])))

    rng = np.random.default_rng(SEED + 4)
    for label, name, nbytes in (c for c in CODES if c[0] in args.codes):
        t = time.perf_counter()
        if name is None:
            codes, tables = pack_bits(matrix), sign_table
        else:
            codec = fit(matrix[rng.choice(len(matrix), FIT_SAMPLE, replace=False)], name,
                        nbytes, seed=SEED)
            codes = np.vstack([codec.encode(matrix[s:s + 100_000])
                               for s in range(0, len(matrix), 100_000)])
            tables = codec.lookup
        held = np.asfortranarray(codes)
        prep_s = time.perf_counter() - t
        for depth in args.rescore:
            ms = []
            for i, q in enumerate(queries):
                t = time.perf_counter()
                scores = lookup_scores(tables(q), held)
                top = np.argpartition(-scores, depth - 1)[:depth]
                rows = ds._take_rows(row_ids[top].tolist(), columns=["vector", "id"])
                exact = column_matrix(rows.column("vector")) @ q
                best = np.argsort(-exact)[:10]
                ms.append((time.perf_counter() - t) * 1000)
                found[i] = [int(v) for v in np.asarray(rows.column("id").to_pylist())[best]]
            results.append((f"{label} + rescore {depth}", f"fit+encode {prep_s:.1f} s",
                            held.nbytes, recall(found, truth), *np.percentile(ms, [50, 99])))
            print(f"[first-stage] {results[-1]}", flush=True)

    for name in args.lance:
        results.extend(lance_ways(LanceStage.parse(name), ds, row_ids, matrix, queries, truth,
                                  args.rescore))
        print(f"[first-stage] {results[-1]}", flush=True)

    for code in args.table_code:
        results.extend(table_code_ways(code, args.rows, matrix, queries, truth, args.rescore,
                                       args.nprobes, args.refine))

    print(f"\n{args.rows:,} rows x {DIMS} (mixture fitted to {len(real):,} real vectors); "
          f"{args.queries} held-out queries; float32 column {matrix.nbytes / 2**20:,.0f} MiB")
    print("| first stage | notes | code memory | recall@10 | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for label, note, nbytes, r, p50, p99 in results:
        mem = "index" if not nbytes else \
            f"{nbytes / 2**20:.1f} MiB (1/{matrix.nbytes / nbytes:.0f})"
        print(f"| {label} | {note} | {mem} | {r:.3f} | {p50:.1f} | {p99:.1f} |")


if __name__ == "__main__":
    main()
