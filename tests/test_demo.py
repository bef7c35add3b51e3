"""`quiver demo` as `make demo` runs it: the standard library's docstrings embedded by the
default model into a fresh warehouse, on the model actor a small run starts while it
plans, and the four demo queries answered from the table."""

from __future__ import annotations

import os
import subprocess
import sys

import lance
from conftest import REPO

from jobs._demo import DEMO_QUERIES
from jobs._embed_service import EARLY_ENV


def _hits(stdout: str) -> dict[str, list[str]]:
    """Each query's printed hit ids (`rank score id snippet` lines under `query: ...`)."""
    hits: dict[str, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("query: "):
            current = hits.setdefault(line.removeprefix("query: "), [])
        elif current is not None and line.strip():
            current.append(line.split()[2])
    return hits


def test_the_demo_embeds_the_standard_library_and_answers_its_queries(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", EARLY_ENV: "1"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--warehouse",
                           str(tmp_path / "warehouse")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    corpus = tmp_path / "warehouse" / "demo" / "stdlib-docs.jsonl"
    modules = sum(1 for _ in corpus.open(encoding="utf-8"))
    assert f"demo corpus: {modules} module docstrings" in proc.stderr
    table = lance.dataset(str(tmp_path / "warehouse" / "stdlib.lance"))
    assert table.count_rows() > modules  # long modules are several chunks
    assert "started while planning" in proc.stdout  # the profile line
    hits = _hits(proc.stdout)
    assert list(hits) == list(DEMO_QUERIES) and all(len(h) == 3 for h in hits.values())
    # the module each query is about answers it first (MiniLM's own ranking here)
    assert hits["compress a file with gzip"][0].startswith("gzip#")
    assert hits["read and write CSV files"][0].startswith("csv#")
