"""One big file: pass 1 over a plain JSON Lines file runs in many tasks, and reading a
compressed one costs its size, not its square.

Builds one plain `.jsonl` and one `.jsonl.gz` of N lines (the scale corpus's synthetic
documents, repeated with new ids; about 950 bytes a line) for each N (250k and 1M by
default), and reports:

- plain file: the planning units (pass-1 tasks: one per `source.unit_bytes`, 64 MiB)
  against the machine's cores, and the peak RSS of the largest unit's pass-1 work
  (`scan_unit`, what one task runs) in a fresh process, less that process's RSS before
  it (goal: the 1M file's within 1.3x of the 250k file's);
- compressed file: the seconds of reading all its shards in one pass (`read_shards`,
  what its single read task runs; goal: at most 4.4x for the 4x file).

    python benchmarks/big_file.py
    python benchmarks/big_file.py --lines 50000,200000    # a quicker look
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / ".warehouse" / "big_file"
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from scale import build_corpus, cpu_kind  # noqa: E402

SCAN_ONE_UNIT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from operators.sources.scan import scan_unit, units_of
from schemas.spec import SourceSpec

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

source = SourceSpec(uri=sys.argv[2], id_field="id")
_, units = units_of(source)
unit = max(units, key=lambda u: (u.stop or u.file.size) - u.start)
before = rss("VmRSS")
scan, tables = scan_unit(unit, source, buckets=4)
print(json.dumps({"units": len(units), "records": sum(s.records for s in scan.shards),
                  "before_mib": round(before, 1), "peak_mib": round(rss("VmHWM"), 1)}))
"""


def write_files(lines: int) -> tuple[Path, Path]:
    """The plain and gzipped files of `lines` lines (made once, then reused)."""
    OUT.mkdir(parents=True, exist_ok=True)
    plain, packed = OUT / f"big-{lines}.jsonl", OUT / f"big-{lines}.jsonl.gz"
    if plain.is_file() and packed.is_file():
        return plain, packed
    corpus = build_corpus(200_000)
    docs: list[str] = []
    for part in sorted(corpus.glob("*.jsonl.gz")):
        with gzip.open(part, "rt", encoding="utf-8") as f:
            docs.extend(f)
    with plain.open("w", encoding="utf-8") as a, \
            gzip.open(packed, "wt", encoding="utf-8", compresslevel=1) as b:
        for i in range(lines):
            doc = json.loads(docs[i % len(docs)])
            doc["id"] = f"{doc['id']}-{i // len(docs)}"
            line = json.dumps(doc) + "\n"
            a.write(line)
            b.write(line)
    return plain, packed


def scan_largest_unit(plain: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", SCAN_ONE_UNIT, str(REPO), str(plain)],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_seconds(packed: Path) -> dict:
    """Plan the compressed file in this process, then time reading every shard in one
    pass, as its read task does."""
    from operators.sources.plan import plan_source
    from operators.sources.read import read_shards
    from schemas.spec import SourceSpec

    source = SourceSpec(uri=str(packed), id_field="id")
    started = time.perf_counter()
    plan = plan_source(source)
    planned = time.perf_counter() - started
    started = time.perf_counter()
    docs = sum(t.num_rows for _, t in read_shards(plan.shards, source=source,
                                                  metadata=plan.metadata, chosen=plan.chosen,
                                                  skips=plan.skips))
    return {"shards": len(plan.shards), "documents": docs, "plan_s": round(planned, 1),
            "read_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default="250000,1000000")
    args = parser.parse_args()
    sizes = [int(x) for x in args.lines.split(",")]
    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores", flush=True)
    found = {}
    for n in sizes:
        plain, packed = write_files(n)
        found[n] = {"bytes": plain.stat().st_size, "plain": scan_largest_unit(plain),
                    "gz": read_seconds(packed)}
        print(f"{n:,} lines ({found[n]['bytes'] / 2**20:.0f} MiB): {json.dumps(found[n])}",
              flush=True)
    lo, hi = found[sizes[0]], found[sizes[-1]]
    for n in sizes:
        units = found[n]["plain"]["units"]
        print(f"{n:,} lines: pass 1 in {units} tasks on {os.cpu_count()} cores "
              f"({'>=' if units >= (os.cpu_count() or 1) else '<'} cores)")

    def task_mib(x: dict) -> float:
        return x["plain"]["peak_mib"] - x["plain"]["before_mib"]

    print(f"largest pass-1 task's memory: {task_mib(hi):.0f} MiB against {task_mib(lo):.0f}"
          f" MiB = {task_mib(hi) / task_mib(lo):.2f}x (goal <= 1.3x)")
    print(f"reading the compressed file: {hi['gz']['read_s']} s against {lo['gz']['read_s']}"
          f" s = {hi['gz']['read_s'] / lo['gz']['read_s']:.2f}x for "
          f"{sizes[-1] / sizes[0]:.0f}x the lines (goal <= 4.4x)")


if __name__ == "__main__":
    main()
