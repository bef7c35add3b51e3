"""A writer stalled past its lease: run A is SIGSTOPped (driver and its Ray) after its
first checkpoint, run B (`--wait`) takes the lease over once it has watched it unchanged
for the timeout, fences the table and finishes the job; then A is resumed. Prints, per
try: whether A committed anything after B's takeover, whether the table reads back whole
(every data file there), rows lost and rows twice against the chunker's ids.

Both runs use the tiny model on 2,000 documents (shards of 50, a checkpoint every 2), and
`QUIVER_LEASE_TIMEOUT_S` (default here 5 s, Quiver's own default 60 s) so a try takes
seconds, not minutes. With `--s3` the table (and so its lease object and the fence) lives
on S3: moto in server mode on 127.0.0.1, the lease taken with conditional writes.

    python benchmarks/lease_stall.py --tries 3
    python benchmarks/lease_stall.py --tries 3 --s3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _docs() -> list[dict]:
    from jobs._demo import build_stdlib_corpus

    path = Path(tempfile.mkdtemp()) / "stdlib.jsonl"
    build_stdlib_corpus(path)
    base = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{"id": f"{d['id']}~{n // len(base)}", "text": d["text"]}
            for n, d in zip(range(2000), itertools.cycle(base), strict=False)]


def _versions(table: str, options: dict | None) -> list[int]:
    import lance

    try:
        return [v["version"] for v in lance.dataset(table, storage_options=options).versions()]
    except ValueError:
        return []


def one_try(n: int, work: Path, corpus: Path, model: str, expected: list[str],
            table: str, options: dict | None, timeout_s: float) -> dict:
    import lance

    spec = work / f"spec-{n}.json"
    spec.write_text(json.dumps({
        "kind": "embed", "table": table, "model": {"name": model},
        "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 50},
        "write": {"shards_per_commit": 2, "keep_checkpoints": True,
                  **({"storage_options": options} if options else {})}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "HF_HUB_OFFLINE": "1", "QUIVER_LEASE_TIMEOUT_S": str(timeout_s)}
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"]
    a = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while a.poll() is None and not _versions(table, options) and time.monotonic() < deadline:
        time.sleep(0.05)
    if a.poll() is not None:
        return {"try": n, "error": "A finished before it could be stopped"}
    os.killpg(a.pid, signal.SIGSTOP)
    stopped_at = max(_versions(table, options))
    b = subprocess.run([*cmd, "--wait"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    b_versions = _versions(table, options)
    os.killpg(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=900)
    after = _versions(table, options)
    ds = lance.dataset(table, storage_options=options)
    rows = ds.to_table()  # every data file of the latest version is read
    ids = rows.column("id").to_pylist()
    return {
        "try": n, "a_stopped_at_version": stopped_at, "b_code": b.returncode,
        "b_took_over": "took over the table's lease" in b.stderr,
        "a_code": a.returncode,
        "a_refused": next((w for w in ("LeaseLostError", "was taken over",
                                       "CommitConflictError", "another writer committed")
                           if w in a_err), a_err.strip().splitlines()[-1:] or ""),
        "a_committed_after_takeover": after != b_versions,
        "rows_lost": len(set(expected) - set(ids)), "rows_twice": len(ids) - len(set(ids)),
        "extra_rows": len(set(ids) - set(expected)), "read_whole": True,
    }


BUCKET = "quiver-lease-stall"


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on a free 127.0.0.1 port, with a bucket; (process, options)."""
    import socket

    import pyarrow.fs as pafs
    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("moto server did not start") from None
            time.sleep(0.2)
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      region="us-east-1", access_key="testing", secret_key="testing",
                      allow_bucket_creation=True).create_dir(BUCKET)
    return proc, {"aws_endpoint": f"http://127.0.0.1:{port}", "allow_http": "true",
                  "aws_region": "us-east-1", "aws_access_key_id": "testing",
                  "aws_secret_access_key": "testing"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--s3", action="store_true",
                        help="the table on S3 (moto on 127.0.0.1) instead of a local folder")
    args = parser.parse_args()
    from conftest import chunk_ids, write_jsonl
    from tiny_model import make_tiny_model

    from operators.model import describe_model
    from schemas.spec import ModelSpec

    work = Path(tempfile.mkdtemp(prefix="lease-stall-"))
    model = str(make_tiny_model(work / "tiny"))
    docs = _docs()
    corpus = write_jsonl(work / "c.jsonl", docs)
    expected = sorted(chunk_ids(describe_model(ModelSpec(name=model)), docs))
    moto, options = start_moto() if args.s3 else (None, None)
    results = []
    try:
        for n in range(1, args.tries + 1):
            table = f"s3://{BUCKET}/try-{n}/t.lance" if args.s3 else str(work / f"t{n}.lance")
            results.append(one_try(n, work, corpus, model, expected, table, options,
                                   args.timeout_s))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
    survived = sum(1 for r in results if r.get("b_code") == 0 and not r["rows_lost"]
                   and not r["rows_twice"] and not r["a_committed_after_takeover"])
    where = "S3 (moto)" if args.s3 else "local"
    print(f"\n{where}, lease timeout {args.timeout_s:g}s: {len(results)} tries, {survived} "
          f"survived, rows lost {sum(r.get('rows_lost', 0) for r in results)}, rows twice "
          f"{sum(r.get('rows_twice', 0) for r in results)}")


if __name__ == "__main__":
    main()
