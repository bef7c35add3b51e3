"""Shard scaling: how one `quiver run` job behaves as the same corpus is cut into more shards.

The corpus is `benchmarks/scale.py`'s synthetic one (documents cut from ../shared/eval, 8
`.jsonl.gz` files, cached under benchmarks/.warehouse/scale/corpus-N) and the model is the
tiny random one (tests/tiny_model.py), so what is measured is Quiver's own machinery:
planning, reading, tokenizing, writing and committing. For each shard count S the job spec
sets `source.records_per_shard = docs // S`, keeps its checkpoint versions
(`write.keep_checkpoints`) and builds no index, as scale.py's does.

For each shard count it runs `quiver run SPEC --json` in a fresh process on a fresh table
and reports:
- wall seconds, process launch to exit;
- the driver's peak RSS: VmHWM of the quiver process itself (not Ray's workers), read from
  /proc/<pid>/status every 0.2 s;
- from the JSON summary: commits, first commit seconds, read and tokenize task-seconds;
- from the summary's `compaction`: the fragments the job wrote and the seconds of its
  end-of-job compaction;
- from the table: fragments (after that compaction), and the manifest bytes of the job's
  first and last commit versions (those whose transaction carries `quiver.job`);
- the first and last commit's seconds: the summary's `commit_seconds` list when there is
  one, else timings on stderr's `checkpoint committed` lines, else the mean
  (profile["commit"] / commits, marked "mean");
- the same spec run again on the finished table (the unchanged rerun): wall seconds and,
  when the summary has it, `source_bytes_read`.

With `--runs N` each configuration runs N times, the shard counts alternating, and the
medians are reported.

`--after` adds, at the largest shard count:
- `reindex`: on that build's table (its corpus a copy), `benchmarks/reindex_scale.py`'s
  1% change spread over every file, then the reindex: its wall seconds and share of the
  build, the driver's seconds writing deletion vectors and the tasks that wrote them;
- `resume`: a fresh build killed (driver and its Ray) once half the chunks are committed,
  then run again: the resumed run's planning seconds against the unchanged rerun's wall,
  and whether the table ends with exactly the corpus's chunk ids, each once.

Results also go to benchmarks/.warehouse/scale_model/results.json.

    python benchmarks/scale_model.py --docs 200000 --shards 200,20000
    python benchmarks/scale_model.py --docs 5000 --shards 10,500      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / ".warehouse" / "scale_model"
SAMPLE_EVERY_S = 0.2
V2_MANIFEST_BASE = 2**64 - 1
"""Lance's V2 manifest paths name version v `{2**64 - 1 - v:020}.manifest`."""
COMMIT_LINE = re.compile(r"checkpoint committed: version (\d+)(.*)")
SECONDS = re.compile(r"(\d+(?:\.\d+)?)\s*s\b")

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from scale import EVAL, build_corpus, cpu_kind, job_spec  # noqa: E402

from jobs._layout import CPU_ROWS_PER_BLOCK  # noqa: E402


def write_spec(corpus: Path, model: str, table: Path, records_per_shard: int) -> Path:
    """scale.py's job spec, with this shard size (JSON is YAML)."""
    spec = job_spec(corpus, model, table, records_per_shard=records_per_shard,
                    rows_per_batch=CPU_ROWS_PER_BLOCK)
    path = table.with_suffix(".spec.json")
    path.write_text(json.dumps(spec, indent=1))
    return path


def remove_table(table: Path) -> None:
    """The table and its rejects table, if any."""
    shutil.rmtree(table, ignore_errors=True)
    shutil.rmtree(table.with_name(table.name.replace(".lance", ".rejects.lance")),
                  ignore_errors=True)


def vm_hwm(pid: int) -> int | None:
    """VmHWM (peak resident set) of `pid` in bytes, or None when it can't be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parse_summary(stdout: str) -> dict:
    """The `--json` summary: all of stdout, or else its last line that parses."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise


def run_quiver(spec: Path, log: Path) -> dict[str, Any]:
    """`quiver run SPEC --json` in a fresh process: wall seconds, the driver's VmHWM, the
    summary and its stderr (kept in `log`)."""
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w", encoding="utf-8") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, env=env,
                                text=True)
        peak = _watch(proc)
        out, _ = proc.communicate()
        wall = time.perf_counter() - started
    stderr = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"quiver run {spec} failed ({proc.returncode}); stderr tail:\n"
                         + "\n".join(stderr.splitlines()[-30:]))
    return {"wall_s": wall, "peak_rss_bytes": peak, "summary": parse_summary(out),
            "stderr": stderr}


def _watch(proc: subprocess.Popen) -> int | None:
    """Sample the process's VmHWM every SAMPLE_EVERY_S until it exits; the last value read
    (VmHWM only grows)."""
    peak = None
    while proc.poll() is None:
        value = vm_hwm(proc.pid)
        if value is not None:
            peak = value
        time.sleep(SAMPLE_EVERY_S)
    return peak


def manifest_path(table: Path, version: int) -> Path | None:
    """The manifest file of `version`, under either of Lance's naming schemes."""
    folder = table / "_versions"
    for name in (f"{V2_MANIFEST_BASE - version:020d}.manifest", f"{version}.manifest"):
        if (folder / name).is_file():
            return folder / name
    return None


def job_versions(ds: Any) -> list[int]:
    """Versions whose transaction carries the `quiver.job` property, oldest first."""
    found = []
    for v in sorted(entry["version"] for entry in ds.versions()):
        try:
            txn = ds.read_transaction(v)
        except Exception:  # a version without a transaction file
            continue
        if txn is not None and "quiver.job" in (txn.transaction_properties or {}):
            found.append(v)
    return found


def inspect_table(table: Path) -> dict[str, Any]:
    """Fragments and the first/last job commit's manifest bytes."""
    import lance

    ds = lance.dataset(str(table))
    versions = job_versions(ds)
    out: dict[str, Any] = {"fragments": len(ds.get_fragments()), "job_versions": versions,
                           "manifest_note": None}
    paths = [manifest_path(table, v) for v in (versions[:1] + versions[-1:])]
    if versions and all(p is not None for p in paths):
        out["first_manifest_bytes"] = paths[0].stat().st_size
        out["last_manifest_bytes"] = paths[-1].stat().st_size
        return out
    sizes = sorted(p.stat().st_size for p in (table / "_versions").glob("*.manifest"))
    out["first_manifest_bytes"], out["last_manifest_bytes"] = (sizes[0], sizes[-1]) if sizes \
        else (None, None)
    out["manifest_note"] = ("job versions' manifests not matched by name: smallest and "
                            "largest manifest in _versions")
    return out


def commit_seconds(summary: dict, stderr: str) -> tuple[float | None, float | None, str]:
    """First and last commit's seconds, and where they came from."""
    listed = summary.get("commit_seconds")
    if isinstance(listed, list) and listed:
        return float(listed[0]), float(listed[-1]), "summary"
    timed = [float(m[0]) for line in stderr.splitlines()
             if (c := COMMIT_LINE.search(line)) and (m := SECONDS.findall(c.group(2)))]
    if timed:
        return timed[0], timed[-1], "stderr"
    commits = summary.get("commits") or 0
    total = (summary.get("profile") or {}).get("commit")
    if not commits or total is None:
        return None, None, "none"
    mean = total / commits
    return mean, mean, "mean"


def measure(corpus: Path, model: str, docs: int, shards: int) -> dict[str, Any]:
    """One fresh run and one unchanged rerun at `shards` shards."""
    table = OUT / f"table-{docs}-{shards}.lance"
    remove_table(table)
    spec = write_spec(corpus, model, table, max(1, docs // shards))
    first = run_quiver(spec, table.with_suffix(".run.log"))
    s = first["summary"]
    first_s, last_s, source = commit_seconds(s, first["stderr"])
    facts = inspect_table(table)
    again = run_quiver(spec, table.with_suffix(".rerun.log"))
    peak = first["peak_rss_bytes"]
    return {
        "shards": shards, "records_per_shard": max(1, docs // shards),
        "planned_shards": s.get("shards"),
        "wall_s": first["wall_s"], "driver_peak_rss_mib": None if peak is None else peak / 2**20,
        "fragments": facts["fragments"], "commits": s.get("commits"),
        "fragments_written": (s.get("compaction") or {}).get("fragments_written"),
        "compaction_s": (s.get("compaction") or {}).get("seconds"),
        "first_commit_s": s.get("first_commit_s"),
        "first_commit_seconds": first_s, "last_commit_seconds": last_s,
        "commit_seconds_source": source,
        "first_manifest_bytes": facts["first_manifest_bytes"],
        "last_manifest_bytes": facts["last_manifest_bytes"],
        "manifest_note": facts["manifest_note"], "job_versions": len(facts["job_versions"]),
        "read_task_s": (s.get("profile") or {}).get("read"),
        "tokenize_task_s": (s.get("profile") or {}).get("tokenize"),
        "documents": s.get("documents"), "chunks": s.get("chunks"),
        "seconds": s.get("seconds"),
        "rerun_wall_s": again["wall_s"],
        "rerun_source_bytes_read": again["summary"].get("source_bytes_read"),
        "rerun_documents": again["summary"].get("documents"),
        "rerun_commits": again["summary"].get("commits"),
    }


def _copy_corpus(corpus: Path, name: str) -> Path:
    copy = OUT / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(corpus, copy)
    return copy


def reindex_after(corpus: Path, model: str, docs: int, shards: int, build: dict) -> dict:
    """A 1% change spread over every file of the measured build's corpus (a copy), then
    the reindex of that build's table."""
    from reindex_scale import change, read_files, write_files

    table = OUT / f"table-{docs}-{shards}.lance"
    spec = write_spec(corpus, model, table, max(1, docs // shards))
    new_files, kinds = change(read_files(corpus), seed=1)
    write_files(corpus, new_files)
    again = run_quiver(spec, table.with_suffix(".reindex.log"))
    r = again["summary"]["reindex"]
    return {"build_wall_s": build["wall_s"], "reindex_wall_s": again["wall_s"],
            "share_of_build": again["wall_s"] / build["wall_s"],
            "deletion_seconds": r["seconds"].get("deletions"),
            "deletion_tasks": r.get("deletion_tasks"), "deleted_rows": r["deleted"],
            "embedded": r["embedded"], "documents": r["documents"],
            "fragments_before": build["fragments"], "seconds": r["seconds"]}


def resume_after(corpus: Path, model: str, docs: int, shards: int, build: dict) -> dict:
    """A build killed once half its chunks are committed, then run again."""
    import signal

    import lance

    table = OUT / f"table-{docs}-{shards}-resume.lance"
    remove_table(table)
    spec = write_spec(corpus, model, table, max(1, docs // shards))
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    killed_at = None
    while proc.poll() is None:
        try:
            rows = lance.dataset(str(table)).count_rows()
        except (ValueError, OSError):
            rows = 0
        if rows >= build["chunks"] // 2:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = rows
            break
        time.sleep(0.2)
    proc.wait()
    resumed = run_quiver(spec, table.with_suffix(".resume.log"))
    s = resumed["summary"]
    ids = lance.dataset(str(table)).to_table(columns=["id"]).column("id")
    out = {"killed_at_rows": killed_at, "of_rows": build["chunks"],
           "resume_wall_s": resumed["wall_s"], "resume_plan_s": s["profile"].get("plan"),
           "unchanged_rerun_wall_s": build["rerun_wall_s"],
           "plan_over_rerun": (s["profile"].get("plan") or 0) / build["rerun_wall_s"],
           "shards_skipped": s.get("shards_skipped"), "rows": len(ids),
           "exact": len(ids) == build["chunks"] and len(set(ids.to_pylist())) == len(ids)}
    remove_table(table)
    return out


def _median(values: list[Any]) -> Any:
    """Median of the numbers; the first value when they aren't all numbers."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) != len(values) or not numbers:
        return values[0]
    return statistics.median(numbers)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key medians of repeated runs of one configuration."""
    row = {key: _median([r[key] for r in runs]) for key in runs[0]}
    row["runs"] = len(runs)
    return row


COLUMNS = (("shards", "shards", "{:,}"), ("planned", "planned_shards", "{:,}"),
           ("wall s", "wall_s", "{:.1f}"),
           ("driver RSS MiB", "driver_peak_rss_mib", "{:.0f}"), ("fragments", "fragments", "{}"),
           ("written", "fragments_written", "{}"), ("compaction s", "compaction_s", "{:.1f}"),
           ("commits", "commits", "{}"), ("1st commit at s", "first_commit_s", "{:.1f}"),
           ("commit s first/last", ("first_commit_seconds", "last_commit_seconds"), "{:.3f}"),
           ("manifest B first/last", ("first_manifest_bytes", "last_manifest_bytes"), "{:,}"),
           ("read task-s", "read_task_s", "{:.1f}"), ("tokenize task-s", "tokenize_task_s",
                                                      "{:.1f}"),
           ("rerun wall s", "rerun_wall_s", "{:.1f}"),
           ("rerun bytes read", "rerun_source_bytes_read", "{:,}"))


def _cell(row: dict[str, Any], key: str | tuple[str, str], fmt: str) -> str:
    if isinstance(key, tuple):
        return "/".join(_cell(row, k, fmt) for k in key)
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[title for title, _, _ in COLUMNS]]
    cells += [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("planned: the shards the job's plan made (shards do not span files, so a file's"
          " remainder is a shard of its own)")
    notes = {r["commit_seconds_source"] for r in rows}
    if "mean" in notes:
        print('commit s first/last: "mean" rows are profile["commit"] / commits, not per commit')
    for r in rows:
        if r["manifest_note"]:
            print(f"{r['shards']} shards: {r['manifest_note']}")


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Last shard count ÷ first, and the last/first commit seconds at the last count."""
    lo, hi = rows[0], rows[-1]

    def ratio(a: Any, b: Any) -> float | None:
        return None if a is None or not b else a / b

    return {"wall": ratio(hi["wall_s"], lo["wall_s"]),
            "driver_peak_rss": ratio(hi["driver_peak_rss_mib"], lo["driver_peak_rss_mib"]),
            "read_task_s": ratio(hi["read_task_s"], lo["read_task_s"]),
            "last_over_first_commit_s": ratio(hi["last_commit_seconds"],
                                              hi["first_commit_seconds"])}


def print_ratios(rows: list[dict[str, Any]], r: dict[str, float | None]) -> None:
    lo, hi = rows[0]["shards"], rows[-1]["shards"]

    def show(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    print(f"\n{hi:,} shards / {lo:,} shards: wall {show(r['wall'])}, driver peak RSS "
          f"{show(r['driver_peak_rss'])}, read task-s {show(r['read_task_s'])}")
    print(f"last commit / first commit at {hi:,} shards: {show(r['last_over_first_commit_s'])}"
          f" ({rows[-1]['commit_seconds_source']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000, help="corpus documents")
    parser.add_argument("--shards", default="200,20000",
                        help="comma-separated shard counts (records_per_shard = docs // S)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs per configuration, alternating; medians are reported")
    parser.add_argument("--keep", action="store_true", help="keep the tables afterwards")
    parser.add_argument("--after", default="",
                        help="comma-separated: reindex, resume (on the largest shard count)")
    args = parser.parse_args()
    shard_counts = [int(s) for s in args.shards.split(",") if s.strip()]
    if not (EVAL / "scifact" / "corpus.jsonl").is_file():
        raise SystemExit(f"{EVAL} not present: the corpus is cut from ../shared/eval")
    from tiny_model import make_tiny_model

    OUT.mkdir(parents=True, exist_ok=True)
    model = str(make_tiny_model(OUT.parent / "scale" / "tiny-model"))
    corpus = build_corpus(args.docs)
    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores; tiny model; {args.docs:,} documents; "
          f"shards {shard_counts}; {args.runs} run(s) each", flush=True)
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in shard_counts}
    steps = [x.strip() for x in args.after.split(",") if x.strip()]
    # the reindex edits its corpus: the largest count's build reads a copy
    last_corpus = _copy_corpus(corpus, "corpus-after") if "reindex" in steps else corpus
    for i in range(args.runs):
        for s in shard_counts:
            runs[s].append(measure(last_corpus if s == shard_counts[-1] else corpus, model,
                                   args.docs, s))
            print(f"run {i + 1}/{args.runs}, {s} shards: {json.dumps(runs[s][-1])}",
                  flush=True)
    rows = [combine(runs[s]) for s in shard_counts]
    print()
    print_table(rows)
    found = ratios(rows) if len(rows) > 1 else {}
    if found:
        print_ratios(rows, found)
    after = {}
    doers = {"reindex": reindex_after, "resume": resume_after}
    for step in steps:
        after[step] = doers[step](last_corpus if step == "reindex" else corpus, model,
                                  args.docs, shard_counts[-1], rows[-1])
        print(f"\n{step} at {shard_counts[-1]:,} shards: {json.dumps(after[step])}",
              flush=True)
    results = {"cpu": cpu_kind(), "cores": os.cpu_count(), "docs": args.docs,
               "runs": args.runs, "rows": rows, "ratios": found, "all_runs": runs,
               "after": after}
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {OUT / 'results.json'}")
    if not args.keep:
        for s in shard_counts:
            remove_table(OUT / f"table-{args.docs}-{s}.lance")
        shutil.rmtree(OUT / "corpus-after", ignore_errors=True)


if __name__ == "__main__":
    main()
