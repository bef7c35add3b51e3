"""What one checkpoint commit costs as the table's fragment count grows.

A Lance commit writes a new manifest listing every fragment of the table, so its cost
follows the fragments in the table, not the commits before it or the shards it names:
this script measures that curve, so the cost of the last commit of a long job can be read
off it. A job's fragments follow its rows (write tasks gather `MIN_ROWS_PER_WRITE` rows;
shards cut at a batch's edges get small fragments of their own), and the job compacts
them at its end (`docs/cluster.md`).

The table is real: one-row fragments written by Lance (`write_fragments` with
`max_rows_per_file=1`), appended until the table holds each size. At each size it times
`operators.write.commit` as a job makes it (the `expect_latest` read of the latest
version, then an `Append` of one new fragment whose transaction names 50 shards of one
file) and reports the median of `--repeats` commits, with the manifest's bytes.

    python benchmarks/commit_cost.py                      # 100 .. 50,000 fragments
    python benchmarks/commit_cost.py --sizes 100 1000     # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lance
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from operators.write import commit, create_empty, write_fragments  # noqa: E402

SCHEMA = pa.schema([pa.field("id", pa.string()),
                    pa.field("vector", pa.list_(pa.float32(), 4))])


def _rows(n: int, tag: str) -> pa.Table:
    flat = pa.array([0.5] * (4 * n), pa.float32())
    return pa.table({"id": [f"{tag}-{i}" for i in range(n)],
                     "vector": pa.FixedSizeListArray.from_arrays(flat, 4)})


def _manifest_bytes(uri: str, version: int) -> int:
    name = f"{2**64 - 1 - version}.manifest"
    path = Path(uri) / "_versions" / name
    return path.stat().st_size if path.exists() else 0


def measure(sizes: list[int], repeats: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="commit-cost-"))
    uri = str(root / "t.lance")
    ds = create_empty(uri, SCHEMA, job="bench")
    held = 0
    results = []
    for size in sorted(sizes):
        while held < size:  # one-row fragments, appended in batches of up to 5,000
            n = min(5_000, size - held)
            fragments = write_fragments(_rows(n, f"fill{held}"), uri, schema=SCHEMA,
                                        max_rows_per_file=1)
            ds = commit(uri, fragments, mode="append", schema=SCHEMA,
                        read_version=ds.version, job="fill", shards=[f"fill:{held}"])
            held += n
        seconds = []
        for r in range(repeats):
            fragment = write_fragments(_rows(1, f"s{size}r{r}"), uri, schema=SCHEMA)
            shards = [f"0123456789ab:{1000 * k}" for k in range(50 * r, 50 * (r + 1))]
            started = time.perf_counter()
            ds = commit(uri, fragment, mode="append", schema=SCHEMA, read_version=ds.version,
                        job="bench", shards=shards, expect_latest=ds.version)
            seconds.append(time.perf_counter() - started)
            held += 1
        row = {"fragments": held, "commit_ms": 1000 * statistics.median(seconds),
               "commit_ms_min": 1000 * min(seconds), "commit_ms_max": 1000 * max(seconds),
               "manifest_bytes": _manifest_bytes(uri, ds.version)}
        results.append(row)
        print(f"{row['fragments']:>8,} fragments: commit {row['commit_ms']:8.1f} ms "
              f"(min {row['commit_ms_min']:.1f}, max {row['commit_ms_max']:.1f}), "
              f"manifest {row['manifest_bytes']:>12,} B", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=7, help="commits timed per size")
    args = parser.parse_args()
    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}; lance {lance.__version__}; local disk; median of {args.repeats} "
          "commits per size")
    results = measure(args.sizes, args.repeats)
    first, last = results[0], results[-1]
    print(f"\n{last['fragments']:,} vs {first['fragments']:,} fragments: commit "
          f"{last['commit_ms'] / first['commit_ms']:.1f}x, manifest "
          f"{last['manifest_bytes'] / max(first['manifest_bytes'], 1):.1f}x")


if __name__ == "__main__":
    main()
