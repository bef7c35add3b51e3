"""`quiver plan` (a dry run that writes nothing), `quiver run --limit N` (a scratch table
of the first N documents), and what a job shows while it runs: progress lines off a
terminal, a live bar on one, and Ray's own logs in a file unless --verbose."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import pytest
import yaml
from conftest import REPO, write_jsonl
from typer.testing import CliRunner

from jobs._progress import JobProgress
from jobs.cli import app

runner = CliRunner()


def _corpus(tmp_path: Path, stdlib_docs: list[dict]) -> Path:
    lines = [json.dumps({"id": d["id"], "text": d["text"][:400], "year": 2000 + i % 3})
             for i, d in enumerate(stdlib_docs[:40])]
    lines[5] = "not json {"
    lines[9] = json.dumps({"text": "a record without an id", "year": 2001})
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _spec_file(tmp_path: Path, corpus: Path, model: str, table: Path,
               records_per_shard: int = 10) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "embed", "table": str(table), "model": {"name": model},
        "source": {"uri": str(corpus), "id_field": "id",
                   "records_per_shard": records_per_shard,
                   "metadata_fields": ["year"]}}))
    return spec


def test_plan_reports_the_job_and_writes_nothing(tmp_path, stdlib_docs, tiny_model,
                                                 ray_local) -> None:
    table = tmp_path / "t.lance"
    spec = _spec_file(tmp_path, _corpus(tmp_path, stdlib_docs), tiny_model, table)
    result = runner.invoke(app, ["plan", str(spec), "--verbose", "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["action"] == "create the table" and data["files_found"] == 1
    assert data["records"] == 40 and data["documents"] == 38 and data["rejected"] == 2
    assert data["shards"] == 4 and data["metadata_schema"] == {"year": "int64"}
    sample = data["reject_sample"]
    assert {r["position"] for r in sample} == {6, 10}
    assert all(r["position_kind"] == "line" and r["source"].endswith("c.jsonl") for r in sample)
    assert data["layout"]["actors"] >= 1 and data["model"]["dim"] == 32
    e = data["estimate"]
    assert e["documents_sampled"] > 0 and e["tokens"] > 0 and e["actor_tokens_per_s"] > 0
    assert e["total_seconds"] == pytest.approx(sum(e["seconds"].values()),
                                                             abs=0.5)
    assert e["seconds"]["plan"] >= 0 and e["seconds"]["actor_start"] > 0  # rounded to 0.1 s
    assert not table.exists()  # a dry run writes nothing


def test_run_limit_embeds_the_first_documents_into_a_scratch_table(tmp_path, stdlib_docs,
                                                                    tiny_model,
                                                                    ray_local) -> None:
    table = tmp_path / "t.lance"
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": d["id"], "text": d["text"][:300]}
                                                 for d in stdlib_docs[:50]])
    # A second try overwrites the scratch table; the third cuts the source's only shard.
    for n, per_shard in ((7, 10), (12, 10), (40, 1000)):
        spec = _spec_file(tmp_path, corpus, tiny_model, table, per_shard)
        result = runner.invoke(app, ["run", str(spec), "--limit", str(n), "--verbose",
                                     "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        scratch = tmp_path / "t.try.lance"
        assert summary["table"] == str(scratch) and summary["documents"] == n
        ids = set(lance.dataset(str(scratch)).to_table(columns=["doc_id"])
                  .column("doc_id").to_pylist())
        assert ids == {d["id"] for d in stdlib_docs[:n]}
    assert not table.exists()


def test_job_off_a_terminal_prints_plain_progress_and_logs_ray_to_a_file(
        tmp_path, stdlib_docs, tiny_model) -> None:
    table = tmp_path / "t.lance"
    spec = _spec_file(tmp_path, _corpus(tmp_path, stdlib_docs), tiny_model, table)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr
    assert "[quiver] embedding: 38/38 documents (100.0%)" in err
    said = [line for line in err.splitlines() if line.startswith("[quiver] Ray's own logs: ")]
    assert len(said) == 1
    log = Path(said[0].split(": ", 1)[1])
    assert log.parent == tmp_path / "logs" and "streaming_executor" in log.read_text()
    for noise in ("streaming_executor", "logging_progress", "Token authentication",
                  "lance::dataset::write"):
        assert noise not in err, noise
    assert "time " in out.stdout and "profile " in out.stdout  # where the time went


def test_the_live_bar_counts_documents_and_the_plain_line_gives_an_eta() -> None:
    screen = io.StringIO()
    bar = JobProgress(100, stream=screen, live=True, unit="documents")
    bar.update(documents=40, chunks=90)
    bar.update(documents=100, chunks=210)
    bar.close()
    drawn = screen.getvalue()
    assert "100/100" in drawn and "documents" in drawn and "chunks/s" in drawn
    plain = io.StringIO()
    lines = JobProgress(100, stream=plain, live=False)
    lines.update(documents=50, chunks=120)
    assert lines.eta() is not None and lines.eta() >= 0
    lines.close()
    assert plain.getvalue().startswith("[quiver] embedding: 50/100 documents (50.0%)")


def test_plan_counts_a_huge_document_at_its_size(tmp_path, stdlib_docs, tiny_model,
                                                 ray_local) -> None:
    """The token estimate scales the sample by the characters pass 1 counted, so one
    huge document the sample never sees still counts: within 30% of the job's tokens
    (a mean per sampled document would give about a third of them here)."""
    short = [{"id": f"s{i}", "text": d["text"][:400]}
             for i, d in enumerate(stdlib_docs[:200])]
    huge = " ".join(d["text"] for d in stdlib_docs[200:])
    while len(huge) < 200_000:
        huge += " " + huge
    docs = [*short, {"id": "huge", "text": huge[:200_000]}]  # last shard: never sampled
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    spec = _spec_file(tmp_path, corpus, tiny_model, table, records_per_shard=10)
    planned = runner.invoke(app, ["plan", str(spec), "--json"], catch_exceptions=False)
    assert planned.exit_code == 0, planned.output
    estimate = json.loads(planned.stdout)["estimate"]
    assert estimate["documents_sampled"] < len(docs)
    ran = runner.invoke(app, ["run", str(spec), "--json"], catch_exceptions=False)
    assert ran.exit_code == 0, ran.output
    tokens = json.loads(ran.stdout)["tokens"]
    sampled_mean = estimate["tokens_per_document"] * len(docs)
    assert sampled_mean < 0.5 * tokens  # the case the mean misses
    assert abs(estimate["tokens"] - tokens) <= 0.3 * tokens, (estimate["tokens"], tokens)
