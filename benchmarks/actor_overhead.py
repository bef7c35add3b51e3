"""The embed actor's own time, outside the forward, before and after the GPU-ready actor.

With the tiny random model (one layer, hidden 32) the forward pass costs little, so what
is left of an actor's time is Quiver's: padding, copies, pooling, encoding, Arrow. This
runs `benchmarks/gpu.py --speed-only` (Quiver's `Embedder` over Arrow blocks as an actor
receives them, against the bare forward over exactly its batches) on two checkouts, one
torch thread each as in a CPU actor, alternating, and prints the medians of the actor's
time outside its forward calls (timed around each call, same run; and (b) - (c)):

- before: the commit before the embedder padded from Arrow offsets (0aa67f5: `to_pylist`,
  a padding loop per row, two syncs per batch);
- after: this checkout.

    python benchmarks/actor_overhead.py                  # 20k synthetic chunks, 3 rounds
    python benchmarks/actor_overhead.py --before REV --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from scale import CACHE, cpu_kind  # noqa: E402

BEFORE = "0aa67f5"
TIMED = "outside_forward_timed_s_per_m_tokens"


def checkout(rev: str) -> Path:
    """A detached worktree of `rev` (made once, reused)."""
    path = Path(tempfile.gettempdir()) / f"quiver-{rev}"
    if not (path / "operators" / "embed.py").is_file():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f",
                        str(path), rev], check=True, capture_output=True)
    return path


def measure(tree: Path, model: str, chunks: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--speed-only", "--model",
             model, "--tree", str(tree), "--limit", "0", "--synthetic", str(chunks),
             "--runs", "3", "--json", out.name],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                 "CUDA_VISIBLE_DEVICES": ""})
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tiny_model import make_tiny_model

    model = str(make_tiny_model(CACHE / "tiny-model"))
    trees = {"before": checkout(args.before), "after": REPO}
    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores; tiny model; {args.chunks:,} synthetic "
          f"chunks; before = {args.before}, after = this checkout; {args.rounds} rounds")
    got: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            got[name].append(measure(tree, model, args.chunks))
    rows = {}
    for name, runs in got.items():
        rows[name] = {k: statistics.median(r[k] for r in runs)
                      for k in (TIMED, "outside_forward_s_per_m_tokens", "b_tok_s", "c_tok_s")}
        r = rows[name]
        print(f"  {name:<6} outside the forward {r[TIMED]:.3f} s per M tokens (rounds: "
              + ", ".join(f"{x[TIMED]:.3f}" for x in runs) + "); (b) - (c) "
              f"{r['outside_forward_s_per_m_tokens']:.3f}; Embedder {r['b_tok_s'] / 1e6:.3f} "
              f"M tok/s, bare forward {r['c_tok_s'] / 1e6:.3f} M tok/s, "
              f"b/c {r['b_tok_s'] / r['c_tok_s']:.3f}")
    for key, label in ((TIMED, "timed around each forward call"),
                       ("outside_forward_s_per_m_tokens", "(b) - (c)")):
        print(f"outside-forward time cut {rows['before'][key] / rows['after'][key]:.1f}x "
              f"({label}; goal >= 5x)")


if __name__ == "__main__":
    main()
