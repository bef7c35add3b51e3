"""`benchmarks/gpu.py` cannot rot: its CPU fallback runs end to end on a few SciFact
documents with the tiny model, measures every column of its table, and writes numbers
that hold together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, eval_dir


def test_gpu_benchmark_cpu_fallback_runs_and_reports(tiny_model, tmp_path: Path) -> None:
    eval_dir("scifact")
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--model", tiny_model,
         "--limit", "30", "--synthetic", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "b/c = " in done.stdout and "(t) tokenizing capacity" in done.stdout
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["documents"] == 30
    assert r["chunks"] > 60 and r["tokens"] > r["chunks"]  # the chunker's rows, real ids
    for key in ("a_tok_s", "b_tok_s", "c_tok_s", "t_tok_s"):
        assert r[key] > 0, key
    # b/c and the other ratios are the benchmark's to report: a test on a machine others
    # share asserts no speed.
    assert r["cosine_min"] > 0.999  # bf16 autocast against fp32, chunk by chunk
    assert abs(r["ndcg10_fp32"] - r["ndcg10_half"]) <= 0.05
