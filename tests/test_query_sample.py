"""The server's sample of query texts (`jobs._query_sample`): a bounded, uniform
reservoir per table, written whole in the format `quiver table qbnorm --queries` reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs._qbnorm import read_queries
from jobs._query_sample import QuerySample


def test_the_sample_is_bounded_and_uniform_over_everything_offered(tmp_path: Path) -> None:
    """500 texts offered one at a time to a sample of 50, over 300 seeds: every text is
    kept with probability 0.1, the first hundred as often as the last."""
    kept = np.zeros(500)
    for seed in range(300):
        sample = QuerySample(tmp_path / str(seed), limit=50, seed=seed, flush_s=1e9)
        for i in range(500):
            sample.add("docs", [f"q{i}"])
        (path,) = sample.flush()
        texts = read_queries(path, 1_000)
        assert len(texts) == len(set(texts)) == 50
        kept[[int(t[1:]) for t in texts]] += 1
        assert sample.seen("docs") == 500
    share = kept / 300
    assert 0.08 < share[:100].mean() < 0.12 and 0.08 < share[-100:].mean() < 0.12, (
        share[:100].mean(), share[-100:].mean())


def test_the_sample_is_written_when_due_and_read_back_after_a_restart(tmp_path: Path) -> None:
    now = [0.0]
    sample = QuerySample(tmp_path, limit=3, flush_s=5.0, seed=1, clock=lambda: now[0])
    sample.add("docs", ["parse arguments", "read a csv"])
    path = sample.path("docs")
    assert not path.exists()  # not due yet
    now[0] = 6.0
    sample.add("docs", ["send an email"])
    assert read_queries(path, 10) == ["parse arguments", "read a csv", "send an email"]
    assert sample.flush() == []  # nothing changed since
    assert [p.name for p in tmp_path.iterdir()] == ["docs.queries.jsonl"]  # no part files
    again = QuerySample(tmp_path, limit=3, seed=2)
    assert again.seen("docs") == 3
    again.add("docs", ["x"] * 100)
    again.flush()
    texts = read_queries(path, 10)
    assert len(texts) == 3 and "x" in texts


def test_a_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path) -> None:
    sample = QuerySample(tmp_path)
    for name in ("../up", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not a table name"):
            sample.add(name, ["q"])
    with pytest.raises(ValueError, match="at least 1"):
        QuerySample(tmp_path, limit=0)
