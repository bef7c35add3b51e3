"""QB-Norm (querybank normalisation) on Quiver's tables: does it help these sets?

QB-Norm (Bogolin et al., 2022) rescores a query's candidates against a bank of other
queries, so rows that come near many queries ("hubs") lose weight. With similarity
s(q, x) and bank B, inverted softmax scores a row as

    exp(beta * s(q, x)) / sum_b exp(beta * s(b, x))

and the dynamic variant (DIS, the paper's default) uses it for a query only when the
query's best row is in the bank's activation set (the rows some bank query ranks first),
else keeps the raw scores. Here the float vectors of each set's Quiver table (default
model, windows chunking; built by `benchmarks/quality.py`) are searched exactly; chunk
scores fold to documents (best chunk); nDCG@10 against the qrels.

The bank: scifact's train split (809 queries, the paper's setting). Cranfield and
limit-small have no train split, so their test queries are cut in two halves: each half
is scored with the other half as its bank (a "stored sample of past queries"), and the
raw scores of the same queries are the baseline.

    python benchmarks/qbnorm.py                       # all three sets, beta 10 20 40
    python benchmarks/qbnorm.py --sets scifact --betas 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
SETS = ("scifact", "cranfield", "limit-small")
sys.path.insert(0, str(REPO / "benchmarks"))


def bank_normaliser(bank: np.ndarray, rows: np.ndarray, beta: float) -> np.ndarray:
    """log sum_b exp(beta * s(b, x)) per row x: the query option's own normaliser
    (`operators.qbnorm.QueryBank.log_norm`), over the whole table in blocks."""
    from operators.qbnorm import QueryBank

    normaliser = QueryBank(np.asarray(bank, np.float32), beta, frozenset(), "")
    return np.concatenate([normaliser.log_norm(rows[s:s + 20_000])
                           for s in range(0, len(rows), 20_000)])


def activation_set(bank: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows that some bank query ranks first."""
    hit = np.zeros(len(rows), bool)
    hit[np.argmax(bank @ rows.T, axis=1)] = True
    return hit


def ndcg(scores: np.ndarray, doc_ids: np.ndarray, qrels: list[dict[str, int]]) -> float:
    """Mean nDCG@10 over queries: each query's chunk scores folded to documents."""
    from operators.evaluate import ndcg_at
    from operators.search import fold_to_documents

    total = 0.0
    for qi, row in enumerate(scores):
        keep = min(300, len(row) - 1)  # enough chunks for 10 documents
        top = np.argpartition(-row, keep)[:keep + 1]
        ranked = [d for d, _ in fold_to_documents(list(doc_ids[top]), row[top].tolist())]
        total += ndcg_at(ranked[:10], qrels[qi], 10)
    return total / len(scores)


def rescored(raw: np.ndarray, log_norm: np.ndarray, beta: float,
             active: np.ndarray | None) -> np.ndarray:
    """Queries' raw scores over every row after QB-Norm: inverted softmax (IS), or with
    `active` (the bank's activation set) its dynamic variant (DIS)."""
    normed = beta * raw - log_norm[None, :]
    if active is None:
        return normed
    use = active[np.argmax(raw, axis=1)]  # the query's best row is a bank hub
    return np.where(use[:, None], normed, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--betas", type=float, nargs="+", default=[10.0, 20.0, 40.0])
    args = parser.parse_args()

    import importlib.util

    from jobs.api import open_table
    from operators.embed import cpu_kind
    from operators.evaluate import load_beir

    # benchmarks/codecs.py (the ladder) loads each set; by path, since `codecs` is also
    # the standard library's name
    spec = importlib.util.spec_from_file_location("ladder", REPO / "benchmarks" / "codecs.py")
    ladder = sys.modules["ladder"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ladder)

    print(f"CPU: {cpu_kind()}", flush=True)
    print("| set | bank | queries | beta | raw nDCG@10 | IS | DIS |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets:
        coll = ladder.load(name)
        if name == "scifact":
            train = load_beir(EVAL / name, split="train")
            uri = str(REPO / "benchmarks" / ".warehouse" / "scifact-windows.lance")
            bank = np.asarray(open_table(uri).embed_queries(train.texts), np.float32)
            folds = [(np.arange(len(coll.queries)), bank, f"train ({len(bank)})")]
        else:
            half = len(coll.queries) // 2
            idx = np.arange(len(coll.queries))
            folds = [(idx[:half], coll.queries[half:], "other half"),
                     (idx[half:], coll.queries[:half], "other half")]
        for beta in args.betas:
            raw_total = is_total = dis_total = 0.0
            for picked, bank, _ in folds:
                qrels, n = [coll.qrels[i] for i in picked], len(picked)
                raw = coll.queries[picked] @ coll.vectors.T
                log_norm = bank_normaliser(bank, coll.vectors, beta)
                active = activation_set(bank, coll.vectors)
                raw_total += n * ndcg(raw, coll.doc_ids, qrels)
                is_total += n * ndcg(rescored(raw, log_norm, beta, None), coll.doc_ids, qrels)
                dis_total += n * ndcg(rescored(raw, log_norm, beta, active), coll.doc_ids,
                                      qrels)
            n, label = len(coll.queries), folds[0][2]
            print(f"| {name} | {label} | {n} | {beta:g} | {raw_total / n:.4f} | "
                  f"{is_total / n:.4f} | {dis_total / n:.4f} |", flush=True)


if __name__ == "__main__":
    main()
