"""Fitting and encoding a first-stage code for 1M vectors in cluster tasks: `quiver table
refit` on a table of 1M 384-d rows (issue 27's "Scaling").

The rows are drawn from the mixture `benchmarks/ann.py` fits to the real scifact and
cranfield chunk vectors (each cluster's mean, its top 8 principal directions and noise)
and written once as a Quiver table: the default model's manifest on the schema, `id` and
a float32 `vector`, 200,000 rows per fragment. Each code is then added to a fresh copy by
`jobs._refit.refit`, as `quiver table refit --code NAME@BYTES` does it:

1. a random sample of the stored vectors (Lance's sample, no full scan) is fitted on the
   driver (`--sample` rows);
2. every fragment is encoded by Ray tasks, two per CPU, and the new column is merged in
   one commit;
3. a Lance-indexed code (`pca-rq`) gets Lance's IVF_RQ on the projection, built on the
   cluster at this size (`index.distributed_min_rows`).

The phases are timed from the refit's own progress lines; Ray is started before the
clock. Every timing is one run: compare codes within a run.

    python benchmarks/refit_scale.py                       # 1M rows: pca-rq@24, pca-b1@24
    python benchmarks/refit_scale.py --rows 200000 --codes opq-pq@24 --sample 20000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from ann import DIMS, SEED, TABLES, WAREHOUSE, batches, fit_mixture, read_vectors  # noqa: E402


def base_table(rows: int) -> Path:
    """The synthetic Quiver table of `rows` mixture vectors, written once and reused."""
    import lance
    import pyarrow as pa

    from jobs._embed_job import build_manifest
    from operators.model import describe_model
    from schemas.spec import ModelSpec, parse_spec

    out = WAREHOUSE / f"refit-{rows}.lance"
    if out.is_dir():
        print(f"[refit] reusing {out}", flush=True)
        return out
    missing = [t for t in TABLES if not t.is_dir()]
    if missing:
        raise SystemExit(f"{missing[0]} missing: run `python benchmarks/quality.py` first")
    mixture = fit_mixture(read_vectors(list(TABLES)), 256, 8, np.random.default_rng(SEED))
    manifest = build_manifest(parse_spec({"kind": "embed", "table": str(out),
                                          "source": {"uri": "x.jsonl", "id_field": "id"}}),
                              describe_model(ModelSpec()), precision="fp32")
    schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), DIMS))],
                       metadata=manifest.to_metadata())
    matrix = np.empty((rows, DIMS), np.float32)
    reader = pa.RecordBatchReader.from_batches(
        schema, (b.cast(schema) for b in batches(mixture, rows, matrix,
                                                  np.random.default_rng(SEED + 1))))
    t = time.perf_counter()
    lance.write_dataset(reader, str(out), schema=schema, max_rows_per_file=200_000)
    print(f"[refit] wrote {rows:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def refit_once(base: Path, code: str, sample: int) -> list[str]:
    """`code` (NAME@BYTES) added to a copy of `base`; the refit's phases as table rows."""
    from jobs._refit import refit
    from schemas.spec import IndexSpec

    name, _, nbytes = code.partition("@")
    work = base.with_name(f"{base.stem}-{name}-{nbytes}.lance")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    marks: list[tuple[float, str]] = []
    started = time.perf_counter()
    out = refit(str(work), name=name, nbytes=int(nbytes), sample=sample,
                index_spec=IndexSpec(),
                progress=lambda line: marks.append((time.perf_counter() - started, line)))
    total = time.perf_counter() - started
    print(f"[refit] {code}: {out['rows']:,} rows, {out['fragments']} fragments, "
          f"{total:.1f} s; index: {out['index']}", flush=True)
    for at, line in marks:
        print(f"[refit]   {at:7.1f} s  {line}", flush=True)
    fitted = next(at for at, line in marks if "fitted on" in line)
    encoding = next(at for at, line in marks if line.startswith("encoding"))
    indexing = next((at for at, line in marks if line.startswith("indexing")), None)
    encoded = (indexing or total) - encoding
    index_s = f"{total - indexing:.1f}" if indexing is not None else "none (scanned code)"
    shutil.rmtree(work, ignore_errors=True)
    return [f"| {code} | {sample:,} | {fitted:.1f} | {encoded:.1f} "
            f"({out['rows'] / encoded / 1e3:,.0f}k rows/s) | {index_s} | {total:.1f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--codes", nargs="+", default=["pca-rq@24", "pca-b1@24"],
                        help="NAME@BYTES, as `quiver table refit --code` takes them")
    parser.add_argument("--sample", type=int, default=4096,
                        help="rows the code is fitted on (the spec's default 4,096)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from jobs._ray import cluster_resources, ensure_ray
    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores", flush=True)
    base = base_table(args.rows)
    t = time.perf_counter()
    ensure_ray()
    print(f"[refit] Ray up in {time.perf_counter() - t:.1f} s "
          f"({cluster_resources()[0]:g} CPUs)", flush=True)
    rows = [r for code in args.codes for r in refit_once(base, code, args.sample)]
    print(f"\n{args.rows:,} rows of {DIMS} dims (float32), one refit per code:\n")
    print("| code | fit sample | sample + fit s | encode + commit s | index s | total s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
