"""Retrieval metrics over BEIR-layout folders (corpus.jsonl, queries.jsonl, qrels/test.tsv).

nDCG uses linear gains (the relevance grade), as trec_eval and BEIR do.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import SourceError

Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class BeirQueries:
    """The judged test queries of a BEIR folder."""

    ids: list[str]
    texts: list[str]
    qrels: Qrels


def load_beir(folder: str | Path, *, split: str = "test") -> BeirQueries:
    """Read the queries that have judgments in `qrels/{split}.tsv`.

    Raises:
        SourceError: naming the missing file.
    """
    root = Path(folder)
    qrels_path = root / "qrels" / f"{split}.tsv"
    queries_path = root / "queries.jsonl"
    for p in (qrels_path, queries_path):
        if not p.is_file():
            raise SourceError(f"{p}: not found (expected a BEIR folder)")
    qrels: Qrels = {}
    with qrels_path.open(encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header and header[0] != "query-id":
            reader = iter([header, *reader])
        for row in reader:
            if len(row) < 3:
                continue
            qid, did, score = row[0], row[1], int(row[2])
            qrels.setdefault(qid, {})[did] = score
    texts: dict[str, str] = {}
    with queries_path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                texts[str(q["_id"])] = q["text"]
    ids = [q for q in qrels if q in texts]
    return BeirQueries(ids, [texts[q] for q in ids], qrels)


def ndcg_at(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    """nDCG@k with linear gains; a grade below 0 gains 0, in the DCG as in the ideal DCG
    (as trec_eval does), so the score stays within [0, 1].

    >>> round(ndcg_at(["a", "b"], {"b": 1}, 10), 4)
    0.6309
    >>> ndcg_at(["a", "b"], {"a": -1, "c": 1}, 10)
    0.0
    """
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    """Share of relevant documents found in the top k.

    >>> recall_at(["a", "b", "c"], {"c": 1, "d": 2}, 3)
    0.5
    """
    relevant = {d for d, g in rels.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top k.

    >>> mrr_at(["a", "b"], {"b": 1}, 10)
    0.5
    """
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def score_runs(runs: Mapping[str, Sequence[str]], qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, recall@10, recall@100 and MRR@10 over the judged queries."""
    judged = [q for q in qrels if any(g > 0 for g in qrels[q].values())]
    if not judged:
        raise ValueError("no query has a positive judgment")
    totals = {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    for q in judged:
        ranked = list(runs.get(q, []))
        totals["ndcg@10"] += ndcg_at(ranked, qrels[q], 10)
        totals["recall@10"] += recall_at(ranked, qrels[q], 10)
        totals["recall@100"] += recall_at(ranked, qrels[q], 100)
        totals["mrr@10"] += mrr_at(ranked, qrels[q], 10)
    return {name: value / len(judged) for name, value in totals.items()}
