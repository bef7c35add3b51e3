"""Read-task CPU at many small shards against few large ones, in one process: 40,000
documents in one `.jsonl.gz`, read through `ShardDatasource`'s read tasks (8 tasks) at
10 and at 1,000 records per shard; CPU seconds, median of 3 passes each.

    python benchmarks/read_blocks.py                 # this checkout
    python benchmarks/read_blocks.py --code /tmp/old # another checkout's code
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
WORK = REPO / "benchmarks" / ".warehouse" / "read_blocks"
DOCS = 40_000


def corpus() -> Path:
    path = WORK / "c.jsonl.gz"
    if path.is_file():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line) for line in
             (EVAL / "scifact" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(DOCS):
            d = texts[i % len(texts)]
            f.write(json.dumps({"id": f"d{i}", "text": (d["title"] + " " + d["text"])[:600],
                                "year": 1990 + i % 30}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(REPO), help="the checkout whose code runs")
    args = parser.parse_args()
    sys.path.insert(0, args.code)
    from jobs._lance_io import ShardDatasource
    from operators.sources.plan import plan_source
    from schemas.spec import SourceSpec

    path = corpus()
    seconds = {}
    for per in (1000, 10):
        source = SourceSpec(uri=str(path), id_field="id", records_per_shard=per)
        plan = plan_source(source)
        tasks = ShardDatasource(plan.shards, source=source, metadata=plan.metadata,
                                chosen=plan.chosen, tasks=8).get_read_tasks(8)
        runs = []
        for _ in range(3):
            started, rows = time.process_time(), 0
            for task in tasks:
                rows += sum(block.num_rows for block in task())
            runs.append(time.process_time() - started)
        seconds[per] = statistics.median(runs)
        print(f"{len(plan.shards)} shards of {per}: {rows} documents, CPU s "
              f"{[round(r, 2) for r in runs]}", flush=True)
    print(f"code {args.code}: 10-record shards cost {seconds[10] / seconds[1000]:.2f}x the "
          "read CPU of 1,000-record shards")


if __name__ == "__main__":
    main()
