"""Retrieval metrics against values worked out by hand, and BEIR loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from operators.evaluate import load_beir, ndcg_at, recall_at, score_runs
from operators.search import fold_to_documents


def test_ndcg_with_graded_relevance() -> None:
    rels = {"a": 3, "b": 1, "c": 2}
    ranked = ["b", "x", "a"]
    dcg = 1 / math.log2(2) + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(ranked, rels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at(["a", "c", "b"], rels, 10) == pytest.approx(1.0)
    assert ndcg_at(["x"], rels, 10) == 0.0


def test_recall_and_score_runs() -> None:
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}, "q3": {"d": 0}}
    runs = {"q1": ["a", "x"], "q2": ["y"] * 10 + ["c"]}
    scores = score_runs(runs, qrels)
    assert recall_at(runs["q1"], qrels["q1"], 10) == 0.5
    assert scores["recall@10"] == pytest.approx(0.25)  # q3 has no positive judgment
    assert scores["recall@100"] == pytest.approx(0.75)
    assert scores["mrr@10"] == pytest.approx(0.5)


def test_fold_keeps_best_chunk_per_document() -> None:
    assert fold_to_documents(["d1", "d2", "d1", "d3"], [0.5, 0.7, 0.9, 0.1]) == [
        ("d1", 0.9), ("d2", 0.7), ("d3", 0.1)]


def test_load_beir(tmp_path: Path) -> None:
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\tA\t1\n2\tB\t2\n")
    (tmp_path / "queries.jsonl").write_text('{"_id": "1", "text": "one"}\n'
                                            '{"_id": "2", "text": "two"}\n'
                                            '{"_id": "3", "text": "unjudged"}\n')
    q = load_beir(tmp_path)
    assert q.ids == ["1", "2"] and q.texts == ["one", "two"]
    assert q.qrels == {"1": {"A": 1}, "2": {"B": 2}}


def _trec(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """trec_eval's own code (pytrec_eval) on the same rankings. It breaks ties by document
    id in reverse, Quiver by document id, so each ranking goes in with strictly falling
    scores (1/(rank+1)) and no tie is left to break: both rank documents alike."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    judged = {q: g for q, g in qrels.items() if any(v > 0 for v in g.values())}
    scored = {q: {d: 1.0 / (i + 1) for i, d in enumerate(runs.get(q, []))} or {"-": 0.0}
              for q in judged}
    top10 = {q: dict(list(s.items())[:10]) for q, s in scored.items()}
    full = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall.100"}).evaluate(scored)
    mrr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10)
    n = len(judged)
    return {"ndcg@10": sum(full[q]["ndcg_cut_10"] for q in judged) / n,
            "recall@100": sum(full[q]["recall_100"] for q in judged) / n,
            "mrr@10": sum(mrr[q]["recip_rank"] for q in judged) / n}


def test_metrics_match_trec_eval_on_scifact() -> None:
    """nDCG@10, recall@100 and MRR@10 of a real ranking of scifact (word overlap between
    each test query and every document, best 100) agree with trec_eval to 1e-4."""
    import json
    import re

    from conftest import eval_dir

    folder = eval_dir("scifact")
    words = re.compile(r"[a-z0-9]+")
    docs = []
    with (folder / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append((d["_id"], set(words.findall(f"{d['title']} {d['text']}".lower()))))
    queries = load_beir(folder)
    runs = {}
    for qid, text in zip(queries.ids, queries.texts, strict=True):
        q = set(words.findall(text.lower()))
        scores = [(len(q & terms) / (1 + len(terms)) ** 0.5, d) for d, terms in docs]
        runs[qid] = [d for d, _ in fold_to_documents([d for _, d in scores],
                                                     [s for s, _ in scores])[:100]]
    ours, theirs = score_runs(runs, queries.qrels), _trec(runs, queries.qrels)
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-4), name
    assert 0.3 < ours["ndcg@10"] < 0.8  # a real ranking, not a degenerate one


def test_negative_grades_gain_nothing_and_match_trec_eval() -> None:
    """Qrels with negative grades (some collections mark harmful documents so): they
    gain 0 in the DCG as in the ideal DCG, nDCG stays within [0, 1], as trec_eval's."""
    qrels = {"q1": {"a": -2, "b": 2, "c": 1}, "q2": {"x": -1, "y": 1}, "q3": {"z": -3}}
    runs = {"q1": ["a", "c", "b"], "q2": ["x", "q", "y"], "q3": ["z"]}
    ours, theirs = score_runs(runs, qrels), _trec(runs, qrels)
    assert 0.0 <= ours["ndcg@10"] <= 1.0
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name
    assert ndcg_at(["a"], {"a": -2, "b": 1}, 10) == 0.0  # was negative before
