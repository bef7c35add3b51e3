"""Overlapping runs of one spec: a second `quiver run` started right after the first
one's first checkpoint, on a local table (5 tries) and on an S3-compatible server (moto
on 127.0.0.1, 3 tries). Prints, per case: tries, runs survived, rows lost, rows twice.

Each try runs `tests/test_faults.py::overlapping_run`: run A, then run B as soon as A
has committed a version, then reads every row back (a missing data file would fail the
read) and compares the ids with the chunker's; the table is then run once more, which
must find nothing to do and leave the ids exact.

    python benchmarks/overlap.py              # about 10 min on 2 cores
    python benchmarks/overlap.py --local 2 --s3 1
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def moto_server() -> tuple[subprocess.Popen, dict[str, str]]:
    import pyarrow.fs as pafs
    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      region="us-east-1", access_key="testing", secret_key="testing",
                      allow_bucket_creation=True).create_dir("overlap")
    return proc, {"aws_endpoint": f"http://127.0.0.1:{port}", "allow_http": "true",
                  "aws_region": "us-east-1", "aws_access_key_id": "testing",
                  "aws_secret_access_key": "testing"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", type=int, default=5)
    parser.add_argument("--s3", type=int, default=3)
    args = parser.parse_args()
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import json

    import lance
    from conftest import chunk_ids, write_jsonl
    from test_faults import N_DOCS, _spec_dict, overlapping_run

    from jobs._demo import build_stdlib_corpus
    from jobs._embed_job import run_embed
    from operators.model import describe_model
    from schemas.spec import ModelSpec, parse_spec

    work = Path(tempfile.mkdtemp(prefix="quiver-overlap-"))
    build_stdlib_corpus(work / "stdlib.jsonl")
    docs = [{"id": d["id"], "text": d["text"]} for d in (
        json.loads(line) for line in (work / "stdlib.jsonl").read_text().splitlines())][:N_DOCS]
    expected = chunk_ids(describe_model(ModelSpec()), docs)
    corpus = write_jsonl(work / "c.jsonl", docs)
    server, options = moto_server() if args.s3 else (None, {})
    results: dict[str, Counter] = {}
    try:
        for case, tries in (("local", args.local), ("s3", args.s3)):
            tally = results.setdefault(case, Counter())
            for i in range(tries):
                table = str(work / f"{case}-{i}.lance") if case == "local" else \
                    f"s3://overlap/{case}-{i}.lance"
                got = overlapping_run(corpus, table, work, wait=False,
                                      storage_options=options if case == "s3" else None)
                ids = got["ids"]
                rerun = _spec_dict(corpus, table)
                if case == "s3":
                    rerun["write"]["storage_options"] = options
                again = run_embed(parse_spec(rerun))
                final = sorted(lance.dataset(table, storage_options=options or None).to_table(
                    columns=["id"]).column("id").to_pylist())
                tally["tries"] += 1
                tally["overlapped"] += got["overlapped"]
                tally["survived"] += got["a_code"] == 0 and final == expected
                tally["b refused"] += got["b_code"] != 0 and "is being written" in got["b_err"]
                tally["rows lost"] += len(set(expected) - set(ids))
                tally["rows twice"] += len(ids) - len(set(ids))
                tally["rerun embedded"] += again.tokens > 0
                print(f"{case} try {i + 1}: A exit {got['a_code']}, B exit {got['b_code']}, "
                      f"{len(ids)} rows, rerun skipped {again.shards_skipped}/{again.shards}",
                      flush=True)
    finally:
        if server is not None:
            server.terminate()
    print("| case | tries | B started while A ran | survived (exact after a rerun) | B refused, "
          "naming A | rows lost | rows twice |")
    print("|---|---|---|---|---|---|---|")
    for case, t in results.items():
        if t["tries"]:
            print(f"| {case} | {t['tries']} | {t['overlapped']} | {t['survived']} | "
                  f"{t['b refused']} | {t['rows lost']} | {t['rows twice']} |")


if __name__ == "__main__":
    main()
