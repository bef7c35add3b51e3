"""End-of-job compaction: the same table of many small fragments compacted by the driver
(`operators.index.Builder`) and by Ray tasks (`jobs._index.ClusterBuilder`), side by side.

The table is synthetic and shaped like a job's output: `--rows` rows (id, doc_id, a
400-character text and a `--dims`-d float32 vector) written as `--fragments` fragments,
as write tasks leave them (one per write set). Each run copies it, compacts the copy and
reports wall seconds, fragments before and after, and the rows read back (they must be
the same rows). Medians over `--runs` runs, the two ways alternating.

    python benchmarks/compaction.py                       # 263k rows in 130 fragments
    python benchmarks/compaction.py --rows 50000 --fragments 50 --runs 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / ".warehouse" / "compaction"


def build(path: Path, rows: int, fragments: int, dims: int) -> None:
    """The source table: `fragments` appends of rows/fragments rows each."""
    import lance
    import numpy as np
    import pyarrow as pa

    if path.exists():
        shutil.rmtree(path)
    rng = np.random.default_rng(0)
    per = rows // fragments
    words = ["the", "of", "retrieval", "vector", "table", "shard", "fragment", "commit",
             "ray", "lance"]
    for f in range(fragments):
        ids = [f"d{f * per + i}" for i in range(per)]
        text = [" ".join(rng.choice(words, 60)) for _ in range(per)]
        vectors = rng.standard_normal((per, dims), dtype=np.float32)
        table = pa.table({"id": [f"{d}#0" for d in ids], "doc_id": ids, "text": text,
                          "vector": pa.FixedSizeListArray.from_arrays(
                              pa.array(vectors.ravel()), dims)})
        lance.write_dataset(table, str(path), mode="append" if f else "create")


def compact_once(source: Path, way: str, workers: int) -> dict:
    import lance

    from jobs._index import ClusterBuilder
    from operators.index import LOCAL

    copy = WORK / f"copy-{way}.lance"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(source, copy)
    ds = lance.dataset(str(copy))
    before = len(ds.get_fragments())
    builder = LOCAL if way == "driver" else ClusterBuilder(workers, {})
    started = time.perf_counter()
    rewritten = builder.compact(ds)
    seconds = time.perf_counter() - started
    after = lance.dataset(str(copy))
    return {"seconds": seconds, "before": before, "after": len(after.get_fragments()),
            "rewritten": rewritten, "rows": after.count_rows()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=263_000)
    parser.add_argument("--fragments", type=int, default=130)
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from scale import cpu_kind

    from jobs._ray import ensure_ray

    WORK.mkdir(parents=True, exist_ok=True)
    source = WORK / "source.lance"
    build(source, args.rows, args.fragments, args.dims)
    ensure_ray()
    results: dict[str, list[dict]] = {"driver": [], "cluster": []}
    for _ in range(args.runs):
        for way in results:
            results[way].append(compact_once(source, way, args.workers))
    import os

    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores; {args.rows:,} rows ({args.dims}-d "
          f"float32 vectors, 400-character texts) in {args.fragments} fragments; "
          f"median of {args.runs}")
    for way, runs in results.items():
        last = runs[-1]
        print(f"{way:>8}: {statistics.median(r['seconds'] for r in runs):6.2f} s, "
              f"fragments {last['before']} -> {last['after']} ({last['rewritten']} "
              f"rewritten), rows {last['rows']:,}"
              + (f", {args.workers} Ray workers" if way == "cluster" else ""))


if __name__ == "__main__":
    main()
