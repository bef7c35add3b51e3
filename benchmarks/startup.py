"""Start-up of a small scheduled job: a 1% SciFact reindex as whole `quiver run`
processes, cold (the run starts its own Ray, as `quiver run` alone and `quiver scheduler
--cold` do) against warm (the run joins a Ray kept up between runs, as `quiver scheduler`
keeps one: `jobs.schedule.WarmRay`).

The table is a copy of `benchmarks/.warehouse/scifact-windows.lance` (made by
`benchmarks/quality.py`; built here with the same spec when it is missing) with its
source copied beside it. Each run flips the source between the corpus and a copy with 1%
of the documents edited, 0.5% deleted and 0.5% added (`benchmarks/reindex.py`'s change),
so every run is a reindex of the same size. The cold runs go first, with no other Ray on
the machine (a second Ray's processes slowed a cold run's own start from about 3 s to
7-8 s here), alternating two kinds: `cold` as `quiver run` runs now (its model actor
started as soon as Ray is up, `jobs._embed_service.EarlyEmbedder`) and `cold, actor after
planning` (`QUIVER_EARLY_EMBEDDER=0`: the actor pool, which starts when the stream
reaches the embed stage); then the kept Ray starts, one warm run loads the kept model actor (shown,
not counted), and two kinds of warm run alternate:
- `warm`: as `quiver scheduler` runs them, on a kept run process
  (`jobs._warm_runner`), imported ahead and reused, so its Ray workers are reused too;
- `warm, own process`: a fresh `quiver run` process joined to the kept Ray, as the
  scheduler ran them before the kept run processes (imports and worker start per run).
Each line gives the run's wall seconds (the whole process for cold and own-process
runs; the request to the kept process's answer for warm ones) and the summary's own
split: Ray start, planning, the first embed actor ready (its worker's imports and the
model load; `kept` when an earlier run loaded it), the embed phase and the index upkeep.
Medians over `--rounds`.

    python benchmarks/startup.py               # 3 rounds, about 5 minutes on 2 cores
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from reindex import change_corpus, load_docs, write_docs  # noqa: E402

from jobs._embed_service import EARLY_ENV, KEEP_ENV  # noqa: E402

SCIFACT = REPO.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"
WAREHOUSE = REPO / "benchmarks" / ".warehouse"
TABLE = WAREHOUSE / "scifact-windows.lance"
SPEC = {"kind": "reindex", "source": {"id_field": "_id", "text_fields": ["title", "text"]},
        "chunking": {"mode": "windows"}, "vectors": {"codecs": ["float32", "int8", "binary"]}}
"""`benchmarks/quality.py`'s scifact spec (its table is the one copied), as a reindex."""


def run(spec: Path, ray_address: str | None, *, early: bool = True) -> dict:
    """One `quiver run --json` process: its wall seconds and summary (`early=False`: the
    run does not start its model actor while it plans)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    env[EARLY_ENV] = "1" if early else "0"
    if ray_address:  # as the warm scheduler runs it
        env["RAY_ADDRESS"] = ray_address
        env[KEEP_ENV] = "1"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"quiver run failed:\n{proc.stderr[-3000:]}")
    return {"wall": wall, **json.loads(proc.stdout)}


def run_kept(spec: Path, pool) -> dict:
    """One run on a kept run process of `pool`, as the warm scheduler makes it."""
    runner = pool.take()
    started = time.perf_counter()
    try:
        summary = runner.run(str(spec), str(spec.parent), None)
    finally:
        pool.give(runner)
    return {"wall": time.perf_counter() - started, **summary}


def row(mode: str, r: dict) -> tuple:
    profile = r.get("profile") or {}
    diff = r.get("reindex") or {}
    return (mode, r["wall"], profile.get("ray_start"), profile.get("plan"),
            "kept" if profile.get("actor_kept") else profile.get("actor_ready"),
            r.get("embed_seconds"), r.get("index_seconds"), r.get("seconds"),
            diff.get("embedded"))


def median(values: list[float]) -> float:
    ordered = sorted(v for v in values if v is not None)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not SCIFACT.is_file():
        raise SystemExit(f"{SCIFACT} is missing (../shared/eval)")

    from jobs.schedule import WarmRay
    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}, "
          f"{os.cpu_count()} cores", flush=True)
    docs = load_docs(SCIFACT, None)
    changed = change_corpus(docs, seed=0).docs
    with tempfile.TemporaryDirectory(prefix="quiver-startup-") as tmp:
        work = Path(tmp)
        corpus, table, spec = work / "corpus.jsonl", work / "t.lance", work / "spec.json"
        write_docs(corpus, docs)
        spec.write_text(json.dumps({**SPEC, "source": {**SPEC["source"], "uri": str(corpus)},
                                    "table": str(table)}))
        if TABLE.is_dir():
            shutil.copytree(TABLE, table)
        else:
            print(f"[startup] {TABLE} missing: building the table first", flush=True)
            run(spec, None)
        rows = []
        flip = False

        def once(mode: str, address: str | None, pool=None, early: bool = True) -> None:
            nonlocal flip
            flip = not flip
            write_docs(corpus, changed if flip else docs)
            rows.append(row(mode, run_kept(spec, pool) if pool
                            else run(spec, address, early=early)))
            print(f"[startup] {rows[-1]}", flush=True)

        for _ in range(args.rounds):
            once("cold", None)
            once("cold, actor after planning", None, early=False)
        warm = WarmRay(work / "logs")
        t = time.perf_counter()
        address = warm.start()
        print(f"[startup] the kept Ray started in {time.perf_counter() - t:.1f} s "
              f"({address})", flush=True)
        once("first warm", address, warm.pool)
        once("first warm, own process", address)
        for _ in range(args.rounds):
            once("warm", address, warm.pool)
            once("warm, own process", address)
    head = ("| run | process s | Ray start | plan | first actor ready | embed | index | "
            "job (own clock) | chunks embedded |")
    print("\n" + head + "\n" + "|---" * 9 + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r)
              + " |")
    for mode in ("cold", "cold, actor after planning", "warm", "warm, own process"):
        mine = [r for r in rows if r[0] == mode]
        print(f"median {mode}: process {median([r[1] for r in mine]):.1f} s, Ray start "
              f"{median([r[2] for r in mine]):.1f} s, embed "
              f"{median([r[5] for r in mine]):.1f} s, job {median([r[7] for r in mine]):.1f} s")


if __name__ == "__main__":
    main()
