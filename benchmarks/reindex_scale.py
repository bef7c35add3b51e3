"""Reindex at scale: a 1% change costs the change plus one cheap scan, with the tiny model.

The corpus is the one `benchmarks/scale.py` builds (synthetic documents cut from
../shared/eval, several `.jsonl.gz` files). Whole `quiver run` processes, start-up and
source scan included:

1. the full build;
2. the change: 0.5% of documents with edited text, 0.5% with edited metadata only,
   0.25% deleted, 0.25% added, spread over every file; then the reindex;
3. the same files rewritten unchanged (new mtimes, same content); then the rerun.

With `--indices` the spec keeps Quiver's default indices (ANN from 100k rows, full text
on) and `--rounds N` repeats step 2 N times with new edits: each round prints the index
upkeep's seconds against the full build's index seconds (goal <= 10%), the segments each
index holds, and ANN recall@10 against exact search over 200 of the table's own vectors
(goal: after the last round, >= 0.95 of the value after the build).

For each it prints wall seconds and the parts the summary reports (plan, document diff,
chunk diff, embed, commit, index upkeep), so a fixed floor shows as one; the reindex and
the rerun as shares of the full build. It checks that the chunks embedded equal the
added and changed chunks (Quiver's chunker run here on just the edited and added
documents, old and new), and that every metadata value in the table matches the new
source.

    python benchmarks/reindex_scale.py                  # 1M documents
    python benchmarks/reindex_scale.py --docs 100000    # a quicker look
    python benchmarks/reindex_scale.py --docs 200000 --indices --rounds 5
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
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from scale import CACHE, build_corpus, cpu_kind  # noqa: E402

SHARES = {"text": 0.005, "metadata": 0.005, "deleted": 0.0025, "added": 0.0025}
GOALS = {"reindex": 0.08, "unchanged": 0.04}


def read_files(folder: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in gzip.open(p, "rt", encoding="utf-8")]
            for p in sorted(folder.glob("*.jsonl.gz"))}


def write_files(folder: Path, files: dict[str, list[dict]]) -> None:
    for name, docs in files.items():
        with gzip.open(folder / name, "wt", encoding="utf-8", compresslevel=1) as fh:
            for doc in docs:
                fh.write(json.dumps(doc) + "\n")


def change(files: dict[str, list[dict]], seed: int) -> tuple[dict, dict]:
    """The new files, and the ids per kind of change (old and new docs for the edits)."""
    rng = random.Random(seed)
    every = [(name, i) for name, docs in files.items() for i in range(len(docs))]
    n = len(every)
    counts = {k: max(1, round(n * s)) for k, s in SHARES.items()}
    picked = rng.sample(every, counts["text"] + counts["metadata"] + counts["deleted"])
    text = set(picked[:counts["text"]])
    meta = set(picked[counts["text"]:counts["text"] + counts["metadata"]])
    gone = set(picked[counts["text"] + counts["metadata"]:])
    out: dict[str, list[dict]] = {}
    kinds: dict[str, list] = {"text": [], "metadata": [], "deleted": [], "added": []}
    for name, docs in files.items():
        kept = []
        for i, doc in enumerate(docs):
            if (name, i) in gone:
                kinds["deleted"].append(doc["id"])
                continue
            if (name, i) in text:
                new = dict(doc, text=doc["text"] + " An edited closing sentence.")
                kinds["text"].append((doc, new))
                doc = new
            elif (name, i) in meta:
                doc = dict(doc, year=doc["year"] + 100)
                kinds["metadata"].append(doc["id"])
            kept.append(doc)
        out[name] = kept
    names = list(out)
    for k in range(counts["added"]):
        donor = rng.choice(out[rng.choice(names)])
        doc = {"id": f"added-{seed}-{k}", "text": f"{donor['text']} (added {k})",
               "year": 2030}
        target = out[rng.choice(names)]
        target.insert(rng.randrange(len(target) + 1), doc)
        kinds["added"].append(doc)
    return out, kinds


def expected_embedded(model: str, kinds: dict, max_tokens: int, fingerprint: str) -> int:
    """Chunks of the added documents, plus the edited documents' chunks whose text (so
    content hash) changed: Quiver's chunker on just those documents, old and new."""
    import pyarrow as pa

    from operators.chunk import Chunker

    chunker = Chunker(model, max_tokens=max_tokens, overlap=32, document_prefix="",
                      metadata=pa.schema([]), config_fingerprint=fingerprint)

    def hashes(docs: list[dict]) -> dict[str, bytes]:
        if not docs:
            return {}
        t = chunker(pa.table({"doc_id": [d["id"] for d in docs],
                              "text": pa.array([d["text"] for d in docs], pa.large_string())}))
        return dict(zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist(),
                        strict=True))

    old = hashes([o for o, _ in kinds["text"]])
    new = hashes([n for _, n in kinds["text"]])
    return len(hashes(kinds["added"])) + sum(1 for c, h in new.items() if old.get(c) != h)


def run(spec: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                         cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return wall, json.loads(out.stdout)


def parts(summary: dict) -> dict:
    p, r = summary["profile"], summary.get("reindex") or {}
    return {"ray_start": p.get("ray_start"), "plan": p.get("plan"),
            **(r.get("seconds") or {}),
            "embed": summary["embed_seconds"], "commit": p.get("commit"),
            "index": summary["index_seconds"], "model_loads": summary["model_loads"],
            "commits": summary["commits"]}


def ann_recall(table: Path, queries: int = 200, k: int = 10) -> float:
    """Mean recall@k of the server's default ANN search against exact search, with
    `queries` of the table's own vectors (every n-th row) as queries."""
    import lance
    import numpy as np

    from operators.search import VectorSearcher
    from schemas.manifest import TableManifest

    ds = lance.dataset(str(table))
    searcher = VectorSearcher(ds, TableManifest.from_schema(ds.schema))
    step = max(1, ds.count_rows() // queries)
    picked = ds.take(list(range(0, ds.count_rows(), step))[:queries], columns=["vector"])
    found = []
    for q in picked.column("vector").to_numpy(zero_copy_only=False):
        q = np.asarray(q, np.float32)
        ann = searcher.search(q, k=k, using="float", columns=("id",)).column("id")
        exact = searcher.search(q, k=k, using="float", exact=True, columns=("id",))
        found.append(len(set(ann.to_pylist()) & set(exact.column("id").to_pylist())) / k)
    return float(np.mean(found))


def segments(table: Path) -> dict[str, int]:
    import lance

    return {d.name: len(d.segments) for d in lance.dataset(str(table)).describe_indices()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indices", action="store_true",
                        help="Quiver's default indices (ANN and full text) instead of none")
    parser.add_argument("--rounds", type=int, default=1, help="reindexes in a row")
    parser.add_argument("--reuse", type=float, metavar="FULL_S",
                        help="keep the table and corpus a previous run left (the table "
                        "in step with the corpus), and take FULL_S as its full build's "
                        "wall seconds; give another --seed so the added ids are new")
    args = parser.parse_args()
    import lance
    from tiny_model import make_tiny_model

    from schemas.manifest import TableManifest

    model = str(make_tiny_model(CACHE / "tiny-model"))
    work = CACHE / f"reindex-{args.docs}"
    table = work / "table.lance"
    if args.reuse is None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(build_corpus(args.docs), work / "corpus")
    elif not table.is_dir():
        raise SystemExit(f"--reuse: no table at {table}; run once without it")
    spec = work / "spec.json"
    spec.write_text(json.dumps({
        "kind": "embed", "table": str(table), "model": {"name": model},
        "source": {"uri": str(work / "corpus" / "*.jsonl.gz"), "id_field": "id",
                   "records_per_shard": 5000},
        **({} if args.indices else {"index": {"ann_min_rows": 10**9, "fts": False}})}))
    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores; tiny model; {args.docs:,} documents; "
          f"indices {'default (ANN, full text)' if args.indices else 'off'}")

    if args.reuse is None:
        full_s, full = run(spec)
        print(f"full build: {full_s:.1f}s, {full['chunks']:,} chunks; parts {parts(full)}")
    else:
        full_s = args.reuse
        print(f"full build: reused the table, {full_s:.1f}s as measured when it was built")
    full_index = full["index_seconds"] if args.reuse is None else None
    if args.indices:
        built_recall = ann_recall(table)
        print(f"  index: {full_index}s of the build; segments {segments(table)}; "
              f"ANN recall@10 {built_recall:.3f}")
    for round_ in range(args.rounds):
        files = read_files(work / "corpus")
        new_files, kinds = change(files, args.seed + round_)
        write_files(work / "corpus", new_files)
        manifest = TableManifest.from_schema(lance.dataset(str(table)).schema)
        want = expected_embedded(model, kinds, manifest.chunking.max_tokens,
                                 manifest.embedding_fingerprint())
        re_s, re = run(spec)
        r = re["reindex"]
        print(f"reindex {round_ + 1}: {re_s:.1f}s = {re_s / full_s:.1%} of the full build "
              f"(goal <= {GOALS['reindex']:.0%}); parts {parts(re)}")
        print(f"  documents {r['documents']}; chunks embedded {r['embedded']}, expected "
              f"{want} {'OK' if r['embedded'] == want else 'MISMATCH'}; kept with their "
              f"vectors {r['unchanged']:,} ({r['carried']} rows rewritten)")
        if args.indices:
            share = f" = {re['index_seconds'] / full_index:.1%} of the build's index " \
                f"time (goal <= 10%)" if full_index else ""
            recall = ann_recall(table)
            print(f"  index upkeep {re['index_seconds']}s{share}; {re['index']}")
            print(f"  segments {segments(table)}; ANN recall@10 {recall:.3f} = "
                  f"{recall / built_recall:.3f} of the built table's (goal >= 0.95)")
        years = {d["id"]: d["year"] for docs in new_files.values() for d in docs}
        rows = lance.dataset(str(table)).to_table(columns=["doc_id", "year"])
        wrong = sum(1 for d, y in zip(rows.column("doc_id").to_pylist(),
                                      rows.column("year").to_pylist(), strict=True)
                    if years.get(d) != y)
        ids_ok = set(rows.column("doc_id").to_pylist()) == set(years)
        print(f"  metadata values that differ from the new source: {wrong}; document ids "
              f"equal the new source's: {ids_ok}")
    write_files(work / "corpus", new_files)  # same content, new mtimes
    un_s, un = run(spec)
    print(f"unchanged rerun: {un_s:.1f}s = {un_s / full_s:.1%} of the full build "
          f"(goal <= {GOALS['unchanged']:.0%}); parts {parts(un)}")


if __name__ == "__main__":
    main()
