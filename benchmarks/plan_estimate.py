"""`quiver plan`'s time estimate against the real `quiver run`, on three corpora:
SciFact (5,183 documents), Cranfield with one 2.4 MB document added (the skewed case a
mean per sampled document misses), and the standard-library demo corpus. The default
model, whole processes, one plan then one run per corpus (goal: within ±30%).

    python benchmarks/plan_estimate.py
    python benchmarks/plan_estimate.py --corpora stdlib     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
HUGE_BYTES = 2_400_000


def _cranfield_skewed(work: Path) -> Path:
    """Cranfield's documents plus one 2.4 MB document made of their own text."""
    docs = [json.loads(line) for line in
            (EVAL / "cranfield" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    text = " ".join(d.get("text", "") for d in docs)
    while len(text) < HUGE_BYTES:
        text += " " + text
    out = work / "cranfield-skewed.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
        f.write(json.dumps({"_id": "huge", "title": "huge", "text": text[:HUGE_BYTES]}) + "\n")
    return out


def specs(work: Path) -> dict[str, dict]:
    return {
        "scifact": {"kind": "embed", "table": str(work / "scifact.lance"),
                    "source": {"uri": str(EVAL / "scifact" / "corpus.jsonl"),
                               "id_field": "_id", "text_fields": ["title", "text"]}},
        "cranfield-skewed": {"kind": "embed", "table": str(work / "cranfield.lance"),
                             "source": {"uri": str(_cranfield_skewed(work)), "id_field": "_id",
                                        "text_fields": ["title", "text"]}},
        "stdlib": {"kind": "embed", "table": str(work / "stdlib.lance"),
                   "source": {"uri": str(REPO / "examples" / "data" / "stdlib.jsonl.gz"),
                              "id_field": "id", "text_fields": ["title", "text"],
                              "metadata_fields": ["category", "definitions"]}},
    }


def _quiver(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jobs.cli", *args, "--json"], cwd=REPO,
                         capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    wall = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"quiver {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", default=["scifact", "cranfield-skewed",
                                                         "stdlib"])
    args = parser.parse_args()
    if not EVAL.is_dir():
        raise SystemExit(f"{EVAL} not present")
    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}, "
          f"{os.cpu_count()} cores; default model")
    work = Path(tempfile.mkdtemp(prefix="plan-estimate-"))
    rows = []
    try:
        for name in args.corpora:
            spec = work / f"{name}.json"
            spec.write_text(json.dumps(specs(work)[name]))
            plan, _ = _quiver("plan", str(spec))
            summary, wall = _quiver("run", str(spec))
            estimate = plan["estimate"]
            rows.append({"corpus": name, "documents": plan["documents"],
                         "estimated_tokens": estimate.get("tokens"),
                         "tokens": summary.get("tokens"),
                         "estimated_s": estimate.get("total_seconds"),
                         "run_s": round(wall, 1),
                         "estimate_over_run": round(estimate["total_seconds"] / wall, 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| corpus | documents | tokens estimated / run | seconds estimated / run | "
          "estimate ÷ run |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corpus']} | {r['documents']:,} | {r['estimated_tokens']:,} / "
              f"{r['tokens']:,} | {r['estimated_s']} / {r['run_s']} | "
              f"{r['estimate_over_run']} |")


if __name__ == "__main__":
    main()
