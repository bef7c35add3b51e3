"""Corpus scale: Quiver's own machinery at 100k and 1M documents, with the tiny model.

The model is a random one-layer BERT (hidden 32) with MiniLM's real tokenizer, so what is
measured is what a GPU job would see: reading, validating, tokenizing, Ray Data's
streaming, writing and committing. The corpus is synthetic documents cut from the real
collections in ../shared/eval, each with a unique id and a numbered suffix (no two texts
repeat), written as several `.jsonl.gz` files.

For each size it runs `quiver run` in a fresh process and reports:
- documents/s and tokens/s end to end (process launch to exit);
- the machinery limit, measured in the same run: (CPU-seconds to parse, tokenize and chunk
  the same documents alone, plus CPU-seconds of the tiny model's bare forward over the
  same chunks) ÷ cores, measured on SAMPLE_DOCS documents and scaled to the corpus
  (median of LIMIT_RUNS measurements before the job and LIMIT_RUNS after: between runs
  of the benchmark the limit itself moved by up to 40% here, so it is printed per run);
- the loaded limit: the same measurement run in one process per core at once, before and
  after the job (their mean). Some machines' cores slow each other down (here a
  pure-Python loop took 15-27% more CPU-seconds with both cores busy; tokenizing and the
  tiny forward did not), and the job always has every core busy, so both ratios are
  printed;
- the time from launch to the first committed checkpoint (the first manifest on disk);
- the driver's peak RSS (sampled every 0.2 s);
- model loads per job, and the bytes of each checkpoint commit's transaction file.

    python benchmarks/scale.py                 # 100k and 1M documents
    python benchmarks/scale.py --sizes 20000   # a quick look
    python benchmarks/scale.py --actors 1      # a one-GPU node's shape on 2 cores
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
SIZES = (100_000, 1_000_000)
FILES = 8
SAMPLE_DOCS = 20_000
LIMIT_RUNS = 3
RECORDS_PER_SHARD = 5_000
SEED = 0
CACHE = REPO / "benchmarks" / ".warehouse" / "scale"

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _cpu_profile import CpuProfile  # noqa: E402

from jobs._layout import CPU_ROWS_PER_BLOCK  # noqa: E402
from operators.embed import cpu_kind  # noqa: E402,F401 (the other benchmarks import it here)


def _texts() -> list[str]:
    texts = []
    for name in ("scifact", "cranfield", "limit-small"):
        path = EVAL / name / "corpus.jsonl"
        with path.open(encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                text = f"{d.get('title', '')} {d.get('text', '')}".strip()
                if text:
                    texts.append(text)
    return texts


def build_corpus(n: int) -> Path:
    """`n` documents as FILES .jsonl.gz files, cached under a folder named by n."""
    out = CACHE / f"corpus-{n}"
    if (out / "done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    texts = _texts()
    per_file = -(-n // FILES)
    for f in range(FILES):
        with gzip.open(out / f"part-{f:03d}.jsonl.gz", "wt", encoding="utf-8",
                       compresslevel=1) as fh:
            for i in range(f * per_file, min(n, (f + 1) * per_file)):
                base = texts[(i * 7919 + SEED) % len(texts)]
                words = base.split()
                cut = words[: max(20, len(words) * (1 + i % 4) // 4)]  # varied lengths
                doc = {"id": f"doc-{i}", "text": " ".join(cut) + f" (variant {i})",
                       "year": 1990 + i % 30}
                fh.write(json.dumps(doc) + "\n")
    (out / "done").write_text(str(n))
    return out


def machinery_limit(corpus: Path, model: str, n: int, rows_per_batch: int) -> dict:
    """CPU-seconds per document to parse + chunk + tokenize, and to run the bare tiny
    forward over the same chunks, measured in this process on SAMPLE_DOCS documents."""
    import pyarrow as pa
    import torch

    from operators.chunk import Chunker
    from operators.embed import Embedder, resolve_precision
    from operators.model import describe_model
    from schemas.spec import ModelSpec

    torch.set_num_threads(1)
    info = describe_model(ModelSpec(name=model))
    chunker = Chunker(info.path, max_tokens=info.max_tokens, overlap=32, document_prefix="",
                      metadata=pa.schema([("year", pa.int64())]), config_fingerprint="x")
    files = sorted(corpus.glob("*.jsonl.gz"))
    wanted = min(SAMPLE_DOCS, n)
    started = time.process_time()
    ids, texts, years = [], [], []
    with gzip.open(files[0], "rt", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            ids.append(d["id"])
            texts.append(d["text"])
            years.append(d["year"])
            if len(ids) >= wanted:
                break
    chunks = []
    for i in range(0, len(ids), 1000):
        docs = pa.table({"doc_id": ids[i:i + 1000],
                         "text": pa.array(texts[i:i + 1000], pa.large_string()),
                         "year": years[i:i + 1000]})
        chunks.append(chunker(docs))
    tokenize_cpu = time.process_time() - started
    embedder = Embedder(info, precision=resolve_precision("auto", on_gpu=False),
                        device="cpu", torch_threads=1)
    started = time.process_time()
    for table in chunks:
        for i in range(0, table.num_rows, rows_per_batch):
            embedder(table.slice(i, rows_per_batch))
    forward_cpu = time.process_time() - started
    scale = n / len(ids)
    return {"sample_docs": len(ids), "tokenize_cpu_s": tokenize_cpu * scale,
            "forward_cpu_s": forward_cpu * scale}


def loaded_limit(corpus: Path, model: str, n: int, rows_per_batch: int, cores: int) -> dict:
    """The same measurement as `machinery_limit`, in `cores` processes at once: the
    CPU-seconds each core needs for the work while every core is busy, as in the job.
    On machines whose cores slow each other down (shared caches, SMT siblings, a
    throttled host) this is what the cores can deliver together; the median process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [f.result() for f in [pool.submit(machinery_limit, corpus, model, n,
                                                 rows_per_batch) for _ in range(cores)]]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def job_spec(corpus: Path, model: str, table: Path, *, records_per_shard: int,
             rows_per_batch: int, actors: int | None = None) -> dict:
    """The benchmark's job: the corpus's `.jsonl.gz` files, the given model, no index
    (the machinery alone), checkpoint versions kept for inspection; `actors` single-thread
    embed actors when given, else the job's own layout."""
    compute = {"rows_per_batch": rows_per_batch}
    if actors is not None:
        compute.update(actors=actors, torch_threads=1)
    return {"kind": "embed", "table": str(table),
            "source": {"uri": str(corpus / "*.jsonl.gz"), "id_field": "id",
                       "records_per_shard": records_per_shard},
            "model": {"name": model},
            "compute": compute,
            "write": {"keep_checkpoints": True},
            "index": {"ann_min_rows": 10**9, "fts": False}}


def run_job(corpus: Path, model: str, n: int, table: Path, rows_per_batch: int,
            env: dict[str, str] | None = None, actors: int | None = None) -> dict:
    """`quiver run` in a fresh process; driver RSS and the first commit watched from here."""
    import shutil

    import psutil

    shutil.rmtree(table, ignore_errors=True)

    spec = job_spec(corpus, model, table, records_per_shard=RECORDS_PER_SHARD,
                    rows_per_batch=rows_per_batch, actors=actors)
    spec_path = table.parent / f"spec-{n}.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec_path), "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            text=True)
    watched = psutil.Process(proc.pid)
    profile = CpuProfile(proc.pid).start()
    peak, first_commit = 0, None
    versions = table / "_versions"
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if first_commit is None and versions.is_dir() and any(
                p.suffix == ".manifest" for p in versions.iterdir()):
            first_commit = time.perf_counter() - started
        time.sleep(0.2)
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    profile.stop()
    if proc.returncode != 0:
        raise SystemExit(f"quiver run failed ({proc.returncode})")
    summary = json.loads(out)
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "first_commit_s": first_commit,
            "summary": summary, "txn_bytes": _txn_bytes(table, summary["commits"]),
            "cpu_by_role": {k: round(v, 1) for k, v in sorted(profile.seconds.items(),
                                                             key=lambda kv: -kv[1])}}


def cluster_check(n: int, model: str, rows_per_batch: int) -> None:
    """The N-document corpus on a 3-node Ray cluster on 127.0.0.1 gives the same table as
    the local run: the same ids, the same row count, the same top hits by exact search."""
    import lance
    import numpy as np
    from conftest import loopback_cluster

    from jobs.api import open_table

    local = CACHE / f"table-{n}-local.lance"
    if not local.is_dir():
        run_job(build_corpus(n), model, n, local, rows_per_batch)
    cluster, _ = loopback_cluster(head={"num_cpus": 1, "include_dashboard": False},
                                  workers=[{"num_cpus": 1}, {"num_cpus": 1}])
    try:
        remote = CACHE / f"table-{n}-cluster.lance"
        job = run_job(build_corpus(n), model, n, remote, rows_per_batch,
                      env={"RAY_ADDRESS": cluster.address})
    finally:
        cluster.shutdown()

    def ids(path: Path) -> list[str]:
        return sorted(lance.dataset(str(path)).to_table(columns=["id"]).column("id")
                      .to_pylist())

    same_ids = ids(local) == ids(remote)
    queries = [json.loads(line)["text"] for line in
               (EVAL / "scifact" / "queries.jsonl").read_text().splitlines()[:50]]
    a, b = open_table(local), open_table(remote)
    same_top = [[h.id for h in a.search(q, k=10, exact=True)] ==
                [h.id for h in b.search(q, k=10, exact=True)] for q in queries]
    score_gap = max(abs(x.score - y.score) for q in queries
                    for x, y in zip(a.search(q, k=10, exact=True), b.search(q, k=10, exact=True),
                                    strict=True))
    print(json.dumps({"cluster_check_docs": n, "nodes": 3, "wall_s": round(job["wall_s"], 1),
                      "same_ids": same_ids,
                      "rows": [lance.dataset(str(local)).count_rows(),
                               lance.dataset(str(remote)).count_rows()],
                      "same_top10": f"{sum(same_top)}/{len(queries)}",
                      "max_score_gap": float(np.round(score_gap, 6))}))


def _txn_bytes(table: Path, commits: int) -> list[int]:
    """Sizes of the checkpoint commits' transaction files, in commit order."""
    files = sorted((table / "_transactions").glob("*.txn"), key=lambda p: p.stat().st_mtime_ns)
    return [p.stat().st_size for p in files[:commits]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--cluster-check", type=int, default=0, metavar="N",
                        help="also run N documents on a 3-node loopback cluster and compare "
                        "with the local table of the same size")
    parser.add_argument("--rows-per-batch", type=int,
                        default=CPU_ROWS_PER_BLOCK,
                        help="compute.rows_per_batch of the job, and the batches of the "
                        "bare forward it is compared with")
    parser.add_argument("--limit-runs", type=int, default=LIMIT_RUNS, metavar="N",
                        help="machinery-limit measurements before the job and after it "
                        "(1 for a quick comparison of two builds)")
    parser.add_argument("--actors", type=int, metavar="N",
                        help="N single-thread embed actors instead of the job's own CPU "
                        "layout (one per CPU); 1 on 2 cores is a one-GPU node's shape: "
                        "one actor feeding the device, tokenizing on the other core")
    args = parser.parse_args()
    if not (EVAL / "scifact" / "corpus.jsonl").is_file():
        raise SystemExit(f"{EVAL} not present: the corpus is cut from ../shared/eval")
    from tiny_model import make_tiny_model

    cores = os.cpu_count() or 1
    model = str(make_tiny_model(CACHE / "tiny-model"))
    print(f"CPU: {cpu_kind()}, {cores} cores; tiny model (1 layer, hidden 32); "
          f"{RECORDS_PER_SHARD} records per shard, {args.rows_per_batch} rows per batch; "
          f"{args.actors or 'default'} actor(s)")
    rows = []
    for n in args.sizes:
        corpus = build_corpus(n)
        runs = [machinery_limit(corpus, model, n, args.rows_per_batch)
                for _ in range(args.limit_runs)]
        loaded = [loaded_limit(corpus, model, n, args.rows_per_batch, cores)]
        job = run_job(corpus, model, n, CACHE / f"table-{n}-local.lance",
                      args.rows_per_batch, actors=args.actors)
        runs += [machinery_limit(corpus, model, n, args.rows_per_batch)
                 for _ in range(args.limit_runs)]  # after too: this machine's speed drifts
        loaded.append(loaded_limit(corpus, model, n, args.rows_per_batch, cores))
        limit = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        loaded_s = statistics.mean(r["tokenize_cpu_s"] + r["forward_cpu_s"]
                                   for r in loaded) / cores
        spread = [round((r["tokenize_cpu_s"] + r["forward_cpu_s"]) / cores, 1) for r in runs]
        s = job["summary"]
        limit_s = (limit["tokenize_cpu_s"] + limit["forward_cpu_s"]) / cores
        assert s["documents"] == n and s["rejects"] == 0, s  # sanity: every doc landed
        txn = job["txn_bytes"]
        rows.append({
            "docs": n, "wall_s": round(job["wall_s"], 1),
            "docs_per_s": round(n / job["wall_s"], 1),
            "tokens_per_s": round(s["tokens"] / job["wall_s"], 1),
            "limit_s": round(limit_s, 1), "limit_runs_s": spread,
            "limit_docs_per_s": round(n / limit_s, 1),
            "ratio_to_limit": round(limit_s / job["wall_s"], 3),
            "loaded_limit_s": round(loaded_s, 1),
            "ratio_to_loaded_limit": round(loaded_s / job["wall_s"], 3),
            "tokenize_share": round(limit["tokenize_cpu_s"] / cores / job["wall_s"], 3),
            "first_commit_s": None if job["first_commit_s"] is None
            else round(job["first_commit_s"], 1),
            "driver_peak_rss_mb": round(job["peak_rss_mb"], 1),
            "model_loads": s["model_loads"], "actors": s["profile"]["actors"],
            "commits": s["commits"],
            "txn_bytes_first_median_last": [txn[0], int(statistics.median(txn)), txn[-1]]
            if txn else [],
            "profile": s["profile"], "cpu_by_role": job["cpu_by_role"],
        })
        print(json.dumps(rows[-1]), flush=True)
    print("\n| docs | wall s | docs/s | tokens/s | limit docs/s | ratio | ratio (loaded) "
          "| first commit s | driver peak MB | loads/actors | commits "
          "| txn bytes (first/median/last) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['docs']:,} | {r['wall_s']} | {r['docs_per_s']} | {r['tokens_per_s']} | "
              f"{r['limit_docs_per_s']} | {r['ratio_to_limit']} | "
              f"{r['ratio_to_loaded_limit']} | {r['first_commit_s']} | "
              f"{r['driver_peak_rss_mb']} | {r['model_loads']}/{r['actors']} | "
              f"{r['commits']} | {r['txn_bytes_first_median_last']} |")
    if args.cluster_check:
        cluster_check(args.cluster_check, model, args.rows_per_batch)
    if len(rows) > 1:
        print(f"driver peak RSS {rows[-1]['docs']:,} / {rows[0]['docs']:,}: "
              f"{rows[-1]['driver_peak_rss_mb'] / rows[0]['driver_peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
