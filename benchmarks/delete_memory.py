"""Driver memory of `quiver table delete --where`: a clause matching 500k documents
against one matching 5k, on a 1M-document table (goal: peak RSS within 1.3x).

Builds a synthetic Lance table (id, doc_id, year, a short text; one chunk per document),
then, for each clause, copies it and runs `delete_documents` (what the CLI calls, the
exclusion list included) in a fresh process, reading that process's own peak RSS
(`VmHWM`) and its RSS just before the delete.

    python benchmarks/delete_memory.py                  # 1M documents
    python benchmarks/delete_memory.py --docs 200000    # a quicker look
    python benchmarks/delete_memory.py --code /tmp/old  # another checkout's code
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".warehouse" / "delete_memory"

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import pyarrow.compute as pc
from jobs._maintenance import delete_documents

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

before = rss("VmRSS")
out = delete_documents(sys.argv[2], where=pc.field("year") < int(sys.argv[3]))
print(json.dumps({"documents": out["documents"], "chunks": out["chunks_deleted"],
                  "rss_before_mib": round(before, 1), "peak_mib": round(rss("VmHWM"), 1)}))
"""


def build(table: Path, docs: int) -> None:
    import lance
    import numpy as np
    import pyarrow as pa

    if table.is_dir() and lance.dataset(str(table)).count_rows() == docs:
        return
    shutil.rmtree(table, ignore_errors=True)
    step = 100_000

    def batches():
        for start in range(0, docs, step):
            n = min(step, docs - start)
            ids = pa.array([f"doc-{i:09d}" for i in range(start, start + n)])
            yield pa.record_batch({
                "id": pc_concat(ids, "#0"), "doc_id": ids,
                # year spreads the documents evenly over 0..999 (one in 1,000 per value)
                "year": pa.array((np.arange(start, start + n) * 7919) % 1000, pa.int64()),
                "text": pa.array([f"text of document {i}" for i in range(start, start + n)])})

    def pc_concat(ids, suffix):
        import pyarrow.compute as pc

        return pc.binary_join_element_wise(ids, suffix, "")

    first = next(batches())
    lance.write_dataset(pa.RecordBatchReader.from_batches(first.schema, batches()),
                        str(table), max_rows_per_file=100_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--code", default=str(REPO), help="the checkout whose code runs")
    args = parser.parse_args()
    table = WORK / f"table-{args.docs}.lance"
    build(table, args.docs)
    results = {}
    for matching in (args.docs // 200, args.docs // 2):
        copy = WORK / "copy.lance"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(WORK / "copy.excluded.lance", ignore_errors=True)
        shutil.copytree(table, copy)
        year = matching * 1000 // args.docs
        out = subprocess.run([sys.executable, "-c", CHILD, args.code, str(copy), str(year)],
                             capture_output=True, text=True, cwd=args.code)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        results[matching] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"clause matching {matching:,} documents: {results[matching]}", flush=True)
    small, big = (results[m]["peak_mib"] for m in sorted(results))
    print(f"{args.docs:,}-document table; code {args.code}: peak RSS {big} MiB against "
          f"{small} MiB = {big / small:.2f}x (goal <= 1.3x)")


if __name__ == "__main__":
    main()
