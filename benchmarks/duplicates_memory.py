"""Driver memory with many duplicate ids: does the driver hold per-record data?

Two synthetic corpora with the same 200k documents (ids), in 8 `.jsonl.gz` files:
- `unique`: each id once (200k records);
- `repeated`: the same ids plus 800k records that repeat one of them (1M records), the
  repeats spread evenly over every file (a seeded shuffle), so 800k duplicates.

Both embed the same 200k documents with the tiny random model (the machinery alone); the
second also plans, reads and rejects 800k duplicates. For each, `quiver run SPEC --json`
runs in a fresh process on a fresh table, and this reports its wall seconds, the driver's
peak RSS (VmHWM of the quiver process itself, sampled every 0.2 s), the saved plan's
bytes and the bytes of the left-out records kept beside it (`x.plan.skips/`, written by
planning tasks). The driver holds no per-record data when the peak barely moves between
the two.

`--code DIR` runs another checkout's code (e.g. a `git worktree` of an older commit)
on the same corpora, for a before/after.

    python benchmarks/duplicates_memory.py
    python benchmarks/duplicates_memory.py --code /tmp/before
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".warehouse" / "duplicates_memory"
FILES = 8
WORDS = ["index", "table", "vector", "query", "shard", "commit", "token", "model", "batch",
         "search", "fragment", "lease", "plan", "schema", "record"]

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from scale import cpu_kind  # noqa: E402
from scale_model import parse_summary, vm_hwm  # noqa: E402


def build_corpus(name: str, ids: int, records: int) -> Path:
    """`records` records over `ids` ids (each id at least once), in FILES gzipped JSON
    Lines files; cached by name."""
    root = WORK / f"{name}-{ids}-{records}"
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(7)
    order = list(range(ids)) + [rng.randrange(ids) for _ in range(records - ids)]
    rng.shuffle(order)
    per = -(-records // FILES)
    for f in range(FILES):
        with gzip.open(root / f"part-{f}.jsonl.gz", "wt", encoding="utf-8") as out:
            for i in range(f * per, min(records, (f + 1) * per)):
                words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12))
                out.write(json.dumps({"id": f"doc-{order[i]:08d}",
                                      "text": f"record {i}: {words}"}) + "\n")
    (root / "done").write_text("")
    return root


def run(corpus: Path, model: str, code: Path) -> dict:
    """One `quiver run` on a fresh table, from `code`'s checkout."""
    table = WORK / f"table-{corpus.name}.lance"
    for path in WORK.glob(f"table-{corpus.name}*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    spec = {"kind": "embed", "table": str(table),
            "source": {"uri": str(corpus / "*.jsonl.gz"), "id_field": "id"},
            "model": {"name": model}, "compute": {"rows_per_batch": 1024},
            "index": {"ann_min_rows": 10**9, "fts": False}}
    spec_path = WORK / f"spec-{corpus.name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec_path),
                             "--json"], cwd=code, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    peak = None
    while proc.poll() is None:
        peak = vm_hwm(proc.pid) or peak
        time.sleep(0.2)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"quiver run failed ({proc.returncode}):\n{err[-3000:]}")
    summary = parse_summary(out)
    base = str(table)[:-len(".lance")]
    plan = Path(base + ".plan.json.gz")
    skips = Path(base + ".plan.skips")
    return {"records": summary["documents"] + summary["rejects"],
            "documents": summary["documents"],
            "duplicates": (summary.get("reject_reasons") or {}).get("duplicate id", 0),
            "wall_s": round(wall, 1), "driver_peak_mib": round((peak or 0) / 2**20, 1),
            "saved_plan_bytes": plan.stat().st_size if plan.exists() else None,
            "skips_bytes": sum(p.stat().st_size for p in skips.rglob("*") if p.is_file())
            if skips.exists() else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, default=200_000)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose code runs")
    args = parser.parse_args()
    from tiny_model import make_tiny_model

    WORK.mkdir(parents=True, exist_ok=True)
    model = str(make_tiny_model(WORK / "tiny-model"))
    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores; code: {args.code}", flush=True)
    rows = {}
    for name, records in (("unique", args.ids), ("repeated", args.records)):
        corpus = build_corpus(name, args.ids, records)
        rows[name] = run(corpus, model, args.code)
        print(name, json.dumps(rows[name]), flush=True)
    ratio = rows["repeated"]["driver_peak_mib"] / rows["unique"]["driver_peak_mib"]
    print(f"driver peak, repeated / unique: {ratio:.2f}x "
          f"({rows['repeated']['duplicates']} duplicates)")
    out = WORK / "results.json"
    results = json.loads(out.read_text()) if out.exists() else []
    results.append({"code": str(args.code), "cpu": cpu_kind(), "rows": rows,
                    "peak_ratio": round(ratio, 3)})
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
