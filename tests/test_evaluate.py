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
