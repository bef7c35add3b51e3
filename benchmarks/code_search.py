"""What the table code's search (`vectors.code: {name: pca-rq}`) loses, and where: the
share of float nDCG@10 kept among 1M distractors (`benchmarks/codecs.py`'s sets, mixture
and measure) when the projection's candidates are found

- `--sweep`: through Lance's IVF_RQ on the PCA projection, for each count of partitions,
  share of them probed, and Lance `refine_factor` on the stored projection (1 = none),
  with the mean latency of one query (Lance's call only);
- `--projections`: by the projection itself, ranked exactly (no index): PCA against a
  query-aware projection (LeanVec's out-of-distribution idea: the top eigenvectors of
  Cx^1/2 Cq Cx^1/2, with Cq from queries that are not scored: scifact's train split,
  and for the sets without one each half of the test queries for the other half).

    python benchmarks/code_search.py --sweep --partitions 1000 250 --probes 0.1 0.4 \\
        --refine 1 4                                     # about 10 min on 2 cores
    python benchmarks/code_search.py --projections --dims 96 128 192   # about 6 min

Every candidate list is `--depth` rows (100), rescored with the float vectors before
nDCG@10, as the table's search does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
# benchmarks/codecs.py (the ladder: sets, mixture, measure), by path: `codecs` is also the
# standard library's name
_spec = importlib.util.spec_from_file_location("ladder", REPO / "benchmarks" / "codecs.py")
ladder = sys.modules["ladder"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ladder)


def sweep(coll, extra: np.ndarray, real: np.ndarray, floats: float, args) -> None:
    """IVF_RQ on the 8 x bytes PCA projection at each partitions / probes / refine."""
    import lance
    import pyarrow as pa

    from operators.codecs import fit
    from operators.index import ann_params

    rows = np.vstack([coll.vectors, extra])
    codec = fit(real, "pca-rq", args.bytes)
    proj = np.vstack([codec.encode(rows[s:s + 100_000]) for s in range(0, len(rows), 100_000)])
    queries = codec.query(coll.queries)
    for partitions in args.partitions:
        with tempfile.TemporaryDirectory(prefix="quiver-code-search-") as tmp:
            table = pa.table({"i": pa.array(np.arange(len(rows))),
                              "p": pa.FixedSizeListArray.from_arrays(pa.array(proj.ravel()),
                                                                     proj.shape[1])})
            ds = lance.write_dataset(table, f"{tmp}/t.lance", max_rows_per_file=200_000)
            params = ann_params("IVF_RQ", rows=len(rows), dims=proj.shape[1],
                                num_partitions=partitions)
            started = time.perf_counter()
            ds.create_index("p", "IVF_RQ", metric="dot", **params)
            built = time.perf_counter() - started
            ds = lance.dataset(f"{tmp}/t.lance")
            for share in args.probes:
                nprobes = max(1, round(share * partitions))
                for refine in args.refine:
                    started = time.perf_counter()
                    cand = []
                    for q in queries:
                        hits = ds.to_table(nearest={
                            "column": "p", "q": q, "k": args.depth, "metric": "dot",
                            "nprobes": nprobes, "refine_factor": refine if refine > 1 else None},
                            columns=["i", "_distance"]).column("i").to_numpy()
                        cand.append(ladder._padded(hits, args.depth))
                    ms = (time.perf_counter() - started) / len(queries) * 1000
                    kept = ladder.ndcg(coll, extra, np.stack(cand)) / floats
                    print(f"| {coll.name} | {partitions} | {nprobes} ({share:.0%}) | {refine} | "
                          f"{kept:.1%} | {ms:.1f} | {built:.0f} s |", flush=True)


def projection(kind: str, dims: int, real: np.ndarray, queries: np.ndarray | None) -> tuple:
    """(mean, dims x 384 orthonormal basis): PCA of the real rows, or query-aware."""
    mean = real.mean(axis=0)
    centred = real - mean
    cx = centred.T @ centred / len(centred)
    if kind == "pca":
        target = cx
    else:
        w, v = np.linalg.eigh(cx)
        root = v @ np.diag(np.sqrt(np.clip(w, 1e-9, None))) @ v.T
        target = root @ (queries.T @ queries / len(queries)) @ root
    w, v = np.linalg.eigh(target)
    basis, _ = np.linalg.qr(v[:, np.argsort(-w)[:dims]])
    return mean, basis


def projections(coll, extra: np.ndarray, real: np.ndarray, floats: float, args) -> None:
    """Exact ranking by each projection; query-aware ones fitted on queries not scored."""
    from jobs.api import open_table

    rows = np.vstack([coll.vectors, extra])
    n = len(coll.queries)
    if coll.name == "scifact":
        train = ladder.EVAL / "scifact" / "qrels" / "train.tsv"
        wanted = {line.split("\t")[0] for line in train.read_text().splitlines()[1:]}
        texts = [r["text"] for r in map(json.loads, (ladder.EVAL / "scifact" /
                 "queries.jsonl").read_text().splitlines()) if r["_id"] in wanted]
        table = REPO / "benchmarks" / ".warehouse" / "scifact-windows.lance"
        fitted = np.asarray(open_table(table).embed_queries(texts), np.float32)
        splits = [(fitted, np.arange(n))]
    else:
        half = np.arange(n) < n // 2
        splits = [(coll.queries[~half], np.flatnonzero(half)),
                  (coll.queries[half], np.flatnonzero(~half))]
    for dims in args.dims:
        for kind in ("pca", "query-aware"):
            total = 0.0
            for fit_queries, scored in splits:
                mean, basis = projection(kind, dims, real, fit_queries)
                proj = np.vstack([(rows[s:s + 200_000] - mean) @ basis
                                  for s in range(0, len(rows), 200_000)])
                q = coll.queries[scored] @ basis
                cand = ladder.top_rows(lambda a, b, p=proj, qq=q: p[a:b] @ qq.T, len(proj),
                                       len(q), args.depth)
                part = ladder.Collection(coll.name, coll.vectors, coll.doc_ids,
                                         coll.queries[scored], [coll.qrels[i] for i in scored])
                total += ladder.ndcg(part, extra, cand) * len(scored)
            print(f"| {coll.name} | {dims} | {kind} | {total / n / floats:.1%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--projections", action="store_true")
    parser.add_argument("--sets", nargs="+", default=list(ladder.SETS), choices=ladder.SETS)
    parser.add_argument("--bytes", type=int, default=24, help="code bytes (8 dims each)")
    parser.add_argument("--partitions", type=int, nargs="+", default=[1000, 250])
    parser.add_argument("--probes", type=float, nargs="+", default=[0.1, 0.4],
                        help="shares of the partitions probed")
    parser.add_argument("--refine", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dims", type=int, nargs="+", default=[96, 128, 192])
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--distractors", type=int, default=1_000_000)
    args = parser.parse_args()
    if not (args.sweep or args.projections):
        parser.error("ask for --sweep, --projections or both")

    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}; "
          "model: default (all-MiniLM-L6-v2)", flush=True)
    colls = [ladder.load(s) for s in ladder.SETS]
    real = np.vstack([c.vectors for c in colls])
    extra = ladder.distractors(real, args.distractors)
    for coll in (c for c in colls if c.name in args.sets):
        rows = np.vstack([coll.vectors, extra])
        exact = ladder.top_rows(lambda a, b, r=rows, c=coll: r[a:b] @ c.queries.T, len(rows),
                                len(coll.queries), args.depth)
        floats = ladder.ndcg(coll, extra, exact)
        print(f"[code-search] {coll.name}: float exact nDCG@10 {floats:.4f} among "
              f"{len(extra):,} distractors", flush=True)
        if args.sweep:
            print("| set | partitions | probed | refine | kept | ms/query | built |\n"
                  "|---|---|---|---|---|---|---|")
            sweep(coll, extra, real, floats, args)
        if args.projections:
            print("| set | dims | projection | kept (exact ranking) |\n|---|---|---|---|")
            projections(coll, extra, real, floats, args)


if __name__ == "__main__":
    main()
