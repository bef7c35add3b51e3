"""The compression ladder: share of float nDCG@10 each first-stage code keeps, by bytes.

For each BEIR collection under ../shared/eval (scifact, cranfield, limit-small) the float
`vector` column of its Quiver table (default model, windows chunking; built by
`benchmarks/quality.py`'s spec and reused) is searched in two stages:

1. a first stage scores every row with a code from `operators.codecs` (the float query
   against the code: asymmetric), or on the stored sign bits with `sign` (the float query
   against +-1, Quiver's binary stage) or `hamming` (the query binarised too, Quiver's
   binary stage before), and keeps the best `depth` rows;
2. those candidates are rescored with their float vectors, folded to documents (best
   chunk), and the top 10 documents are scored with nDCG@10 against the qrels.

`kept` is that nDCG@10 divided by exact float search's over the same rows. Each set is
searched alone, and among `--distractors` rows (1M by default) drawn from a mixture fitted
to the real vectors of all three sets (`benchmarks/ann.py`'s model: 256 k-means clusters,
each its mean plus its top 8 principal directions plus noise). Small collections flatter
every code: 100 candidates are 1% of scifact's chunks but 0.01% of 1M rows.

`--lance IVF_PQ:24 IVF_RQ:1 pca192/IVF_RQ:1` adds Lance's own compact indices as first
stages, side by side (`benchmarks/lance_stage.py` names them): the rows are written to a
scratch Lance table with that index, and Lance's nearest search without refine gives the
`depth` best rows by the index's own score. Those are rescored in float like every other
first stage, which is what Lance's `refine_factor` = depth / 10 does for a search of 10.
Only among distractors: Quiver builds no ANN index below 100k rows. A projection is
fitted on the real vectors (`fit=real`).

Codes are fitted on a sample of the rows searched (`fit=sample`: the real rows alone, or
mostly distractors among them) and, among distractors, on the real vectors only
(`fit=real`), since the mixture is low-rank within a cluster and may flatter PCA.

    python benchmarks/codecs.py                                  # the full ladder
    python benchmarks/codecs.py --distractors 100000 --bytes 24  # a quick look
    python benchmarks/codecs.py --codes pca-b1 opq-pq --json ladder.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
SETS = ("scifact", "cranfield", "limit-small")
BYTES = (8, 12, 16, 24, 32, 48)
DEPTHS = (40, 100, 200)
CODES = ("first-b1", "pca-b1", "itq-b1", "pca-b2", "rot-b2", "rot-b4", "pca-pq", "opq-pq")
FIT_SAMPLE = 50_000
BLOCK = 50_000
SEED = 7

sys.path.insert(0, str(REPO / "benchmarks"))


@dataclass
class Collection:
    """One set's chunk vectors, their documents, and its judged queries' vectors."""

    name: str
    vectors: np.ndarray
    doc_ids: np.ndarray
    queries: np.ndarray
    qrels: list[dict[str, int]]


def load(name: str) -> Collection:
    """Embed (or reuse) the set's table and its queries with the default model."""
    import lance
    from quality import ensure_table

    from jobs.api import open_table
    from operators.evaluate import load_beir

    uri = ensure_table(name, "windows")
    table = lance.dataset(uri).to_table(columns=["vector", "doc_id"])
    vectors = table.column("vector").combine_chunks().flatten().to_numpy()
    beir = load_beir(EVAL / name)
    queries = open_table(uri).embed_queries(beir.texts)
    return Collection(name, np.ascontiguousarray(vectors.reshape(table.num_rows, -1),
                                                 np.float32),
                      np.asarray(table.column("doc_id").to_pylist(), dtype=object),
                      np.asarray(queries, np.float32),
                      [beir.qrels[q] for q in beir.ids])


def distractors(real: np.ndarray, rows: int) -> np.ndarray:
    """`rows` vectors from the mixture fitted to the real vectors of every set."""
    from ann import fit_mixture

    mixture = fit_mixture(real, 256, 8, np.random.default_rng(SEED))
    rng = np.random.default_rng(SEED + 1)
    return np.vstack([mixture.sample(min(BLOCK, rows - s), rng)
                      for s in range(0, rows, BLOCK)]) if rows else np.zeros((0, real.shape[1]),
                                                                             np.float32)


def _padded(rows: np.ndarray, depth: int) -> np.ndarray:
    """`depth` row numbers: an index that found fewer repeats its last (no new hit)."""
    return np.concatenate([rows, np.full(depth - len(rows), rows[-1] if len(rows) else 0)])


def top_rows(scores_of, n_rows: int, queries: int, depth: int) -> np.ndarray:
    """(queries, depth) indices of the best rows, best first; `scores_of(start, stop)`
    gives the (stop - start, queries) score block of those rows."""
    best_i = np.zeros((queries, 0), np.int64)
    best_s = np.zeros((queries, 0), np.float32)
    for start in range(0, n_rows, BLOCK):
        stop = min(start + BLOCK, n_rows)
        block = scores_of(start, stop).T  # (queries, rows)
        keep = min(depth, block.shape[1])
        part = np.argpartition(-block, keep - 1, axis=1)[:, :keep]
        ids = np.concatenate([best_i, part + start], axis=1)
        sc = np.concatenate([best_s, np.take_along_axis(block, part, axis=1)], axis=1)
        keep = min(depth, ids.shape[1])
        top = np.argpartition(-sc, keep - 1, axis=1)[:, :keep]
        best_i, best_s = np.take_along_axis(ids, top, 1), np.take_along_axis(sc, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def ndcg(coll: Collection, extra: np.ndarray, candidates: np.ndarray) -> float:
    """Mean nDCG@10 after rescoring each query's candidate rows (indices into the set's
    rows, then the distractors) with their float vectors and folding to documents."""
    from operators.evaluate import ndcg_at
    from operators.search import fold_to_documents

    n = len(coll.vectors)
    total = 0.0
    for qi, rows in enumerate(candidates):
        mine, theirs = rows[rows < n], rows[rows >= n] - n
        vec = np.vstack([coll.vectors[mine], extra[theirs]])
        docs = list(coll.doc_ids[mine]) + [f"~{i}" for i in theirs]
        scores = vec @ coll.queries[qi]
        ranked = [d for d, _ in fold_to_documents(docs, scores.tolist())][:10]
        total += ndcg_at(ranked, coll.qrels[qi], 10)
    return total / len(candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--codes", nargs="*", default=list(CODES))
    parser.add_argument("--baselines", nargs="*", default=["hamming", "sign"],
                        choices=("hamming", "sign"),
                        help="first stages on the stored sign bits, no fit: hamming "
                        "(query binarised) and sign (float query against +-1)")
    parser.add_argument("--bytes", type=int, nargs="+", default=list(BYTES))
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--distractors", type=int, default=1_000_000)
    parser.add_argument("--fits", nargs="+", default=["sample", "real"],
                        choices=("sample", "real"),
                        help="what codes are fitted on among distractors: a sample of the "
                        "rows searched, or the real vectors only (alone, both are the "
                        "real vectors)")
    parser.add_argument("--lance", nargs="*", default=[],
                        help="Lance index first stages, e.g. IVF_PQ:24 (24 sub-vectors of "
                        "8 bits) IVF_PQ:48:4 IVF_RQ:1 (bits per dimension) pca192/IVF_RQ:1")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[0],
                        help="IVF partitions the --lance stages probe (0: Quiver's default, "
                        "max(20, 4000/sqrt(rows)), or a projected stage's share of its "
                        "partitions; several values run each)")
    parser.add_argument("--json", type=Path, help="Write the rows to this JSON file.")
    args = parser.parse_args()

    from lance_stage import BuiltStage, LanceStage

    from operators.codecs import budget_dims, fit
    from operators.embed import cpu_kind
    from operators.quantize import hamming, pack_bits

    stages = [LanceStage.parse(name) for name in args.lance]
    missing = [s for s in args.sets if not (EVAL / s / "corpus.jsonl").is_file()]
    if missing:
        raise SystemExit(f"{EVAL}: {', '.join(missing)} absent")
    print(f"CPU: {cpu_kind()}; "
          f"model: default (all-MiniLM-L6-v2)", flush=True)
    colls = [load(s) for s in args.sets]
    real = np.vstack([c.vectors for c in colls])
    started = time.perf_counter()
    extra_all = distractors(real, args.distractors)
    print(f"[codecs] {len(extra_all):,} distractors from a mixture fitted to {len(real):,} "
          f"real vectors in {time.perf_counter() - started:.1f} s", flush=True)
    depth = max(args.depths)
    rng = np.random.default_rng(SEED)
    results: list[dict] = []

    def record(coll, extra, candidates, codec, nbytes, fitted):
        for d in args.depths:
            kept = ndcg(coll, extra, candidates[:, :d]) / floats[(coll.name, len(extra))]
            results.append({"codec": codec, "set": coll.name, "bytes": nbytes,
                            "distractors": len(extra), "fit": fitted, "depth": d,
                            "kept": round(kept, 4)})

    settings = [0] + ([len(extra_all)] if len(extra_all) else [])
    floats: dict[tuple[str, int], float] = {}
    for coll in colls:
        for n_extra in settings:
            extra = extra_all[:n_extra]
            rows = np.vstack([coll.vectors, extra])
            cand = top_rows(lambda a, b, r=rows, c=coll: r[a:b] @ c.queries.T, len(rows),
                            len(coll.queries), depth)
            floats[(coll.name, n_extra)] = ndcg(coll, extra, cand)
            print(f"[codecs] {coll.name} float exact nDCG@10 among {n_extra:,} distractors: "
                  f"{floats[(coll.name, n_extra)]:.4f}", flush=True)
            # the stored sign bits (threshold 0): hamming, the query binarised too (Quiver
            # before), and `sign`, the float query against +-1 (Quiver's binary stage now)
            bits = pack_bits(rows)
            if "hamming" in args.baselines:
                qbits = pack_bits(coll.queries)
                cand = top_rows(lambda a, b, bt=bits, qb=qbits: -np.stack(
                    [hamming(q, bt[a:b]) for q in qb], axis=1).astype(np.float32),
                    len(rows), len(coll.queries), depth)
                record(coll, extra, cand, "hamming", bits.shape[1], "none")
            if "sign" in args.baselines:
                cand = top_rows(lambda a, b, bt=bits, c=coll: (
                    np.unpackbits(bt[a:b], axis=1).astype(np.float32) * 2 - 1) @ c.queries.T,
                    len(rows), len(coll.queries), depth)
                record(coll, extra, cand, "sign", bits.shape[1], "none")
            for stage in stages if n_extra else ():  # Quiver indexes 100k rows and up
                with tempfile.TemporaryDirectory(prefix="quiver-codecs-") as tmp:
                    built = BuiltStage(stage, rows, Path(tmp), fit_sample=real)
                    for nprobes in args.nprobes:
                        built.nprobes = nprobes or built.default_nprobes
                        cand = np.stack([_padded(built.top(q, depth), depth)
                                         for q in coll.queries])
                        label = f"lance {stage.name}" + (f" nprobes {nprobes}" if nprobes
                                                         else "")
                        record(coll, extra, cand, label, stage.bytes_per_row(rows.shape[1]),
                               "real" if stage.projection else "index")
                print(f"[codecs] lance {stage.name} on {len(rows):,} rows: built in "
                      f"{built.build_s:.1f} s, index {built.index_bytes / 2**20:.1f} MiB",
                      flush=True)
            del rows, bits

    for nbytes in args.bytes:
        for name in args.codes:
            if budget_dims(name.split("-")[1], nbytes, real.shape[1]) is None:
                continue
            # (fit name, fitted on, settings searched): alone, codes are fitted on the
            # real vectors; among distractors, on a sample of all rows and/or real only.
            plans = [("real", real, [0] if "real" not in args.fits else settings)]
            if len(extra_all) and "sample" in args.fits:
                pick = rng.choice(len(real) + len(extra_all),
                                  size=min(FIT_SAMPLE, len(real) + len(extra_all)),
                                  replace=False)
                plans.append(("sample", np.vstack(
                    [real[pick[pick < len(real)]],
                     extra_all[pick[pick >= len(real)] - len(real)]]), settings[1:]))
            for fitted, sample, searched in plans:
                t0 = time.perf_counter()
                try:
                    codec = fit(sample, name, nbytes, seed=SEED)
                except ValueError as err:
                    print(f"[codecs] skip {name} {nbytes} B fit={fitted}: {err}", flush=True)
                    continue
                fit_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                extra_codes = np.vstack([codec.encode(extra_all[s:s + BLOCK])
                                         for s in range(0, len(extra_all), BLOCK)]) \
                    if max(searched) else None
                enc_s = time.perf_counter() - t0
                for coll in colls:
                    own = codec.encode(coll.vectors)
                    q = codec.query(coll.queries)
                    for n_extra in searched:
                        codes = own if n_extra == 0 else np.vstack([own, extra_codes])

                        def block(a, b, cd=codes, qq=q, cc=codec):
                            return cc.decode(cd[a:b]) @ qq.T

                        cand = top_rows(block, len(codes), len(coll.queries), depth)
                        record(coll, extra_all[:n_extra], cand, name, nbytes, fitted)
                print(f"[codecs] {name} {nbytes} B fit={fitted}: fit {fit_s:.1f} s, encode "
                      f"{len(extra_all) if max(searched) else 0:,} rows {enc_s:.1f} s; "
                      "kept@100 " + ", ".join(
                          f"{r['set']}/{r['distractors']:,}={r['kept']:.3f}"
                          for r in results if r["codec"] == name and r["bytes"] == nbytes
                          and r["fit"] == fitted and r["depth"] == 100), flush=True)

    print_table(results, args.depths)
    if args.json:
        args.json.write_text(json.dumps({"rows": results}, indent=1))
        print(f"[codecs] wrote {len(results)} rows to {args.json}")


def print_table(results: list[dict], depths: list[int]) -> None:
    """One markdown row per code, budget, fit and setting; a column per set and depth."""
    sets = list(dict.fromkeys(r["set"] for r in results))
    keys = list(dict.fromkeys((r["codec"], r["bytes"], r["fit"], r["distractors"])
                              for r in results))
    cols = [(s, d) for s in sets for d in depths]
    print("\n| code | bytes | fit | distractors | " + " | ".join(
        f"{s} @{d}" for s, d in cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    index = {(r["codec"], r["bytes"], r["fit"], r["distractors"], r["set"], r["depth"]):
             r["kept"] for r in results}
    for key in sorted(keys, key=lambda k: (k[3], k[1], k[0], k[2])):
        cells = [index.get((*key, s, d)) for s, d in cols]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:,} | " + " | ".join(
            "—" if c is None else f"{100 * c:.1f}%" for c in cells) + " |")


if __name__ == "__main__":
    main()
