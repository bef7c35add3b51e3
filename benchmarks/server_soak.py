"""Server soak: 20 reindexes of one table while a client queries the server in a loop.

`quiver serve` follows the table's `current` tag, so each reindex makes it open a new
version. Before the LRU of open tables and the shared query model, every version stayed
open with its own model copy. This prints the server's resident memory after the first
reindex and after the last (goal: at most 1.3x), and the requests that failed (goal: 0).
Tiny model, the standard library's docstrings, everything on 127.0.0.1.

    python benchmarks/server_soak.py                 # 20 reindexes, about 5 minutes
    python benchmarks/server_soak.py --reindexes 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from scale import CACHE  # noqa: E402

QUERIES = ["regular expressions", "sockets and networking", "date and time", "files",
           "threads", "json parsing", "compression", "unit tests"]


def _post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
        return resp.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reindexes", type=int, default=20)
    parser.add_argument("--docs", type=int, default=400)
    args = parser.parse_args()
    import psutil
    from conftest import start_server, write_jsonl
    from tiny_model import make_tiny_model

    from jobs._demo import build_stdlib_corpus

    model = str(make_tiny_model(CACHE / "tiny-model"))
    work = Path(tempfile.mkdtemp(prefix="quiver-soak-"))
    build_stdlib_corpus(work / "stdlib.jsonl")
    docs = [json.loads(line) for line in (work / "stdlib.jsonl").read_text().splitlines()]
    docs = [{"id": d["id"], "text": d["text"]} for d in docs[:args.docs]]
    corpus = write_jsonl(work / "c.jsonl", docs)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"kind": "embed", "table": str(work / "docs.lance"),
                                "model": {"name": model},
                                "source": {"uri": str(corpus), "id_field": "id"},
                                "index": {"ann_min_rows": 10**9}}))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "HF_HUB_OFFLINE": "1"}

    def quiver_run() -> None:
        subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                       cwd=REPO, env=env, check=True, capture_output=True)

    quiver_run()
    server, base = start_server(work, env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    url = f"{base}/tables/docs/search"
    stop, tally = threading.Event(), {"ok": 0, "failed": 0, "errors": []}

    def client() -> None:
        i = 0
        while not stop.is_set():
            try:
                status = _post(url, {"query": QUERIES[i % len(QUERIES)], "k": 5})
                tally["ok" if status == 200 else "failed"] += 1
            except Exception as err:  # noqa: BLE001 - every failure is counted and shown
                tally["failed"] += 1
                tally["errors"].append(repr(err)[:200])
            i += 1

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    rss = []
    try:
        for n in range(args.reindexes):
            docs[n % len(docs)] = dict(docs[n % len(docs)],
                                       text=docs[n % len(docs)]["text"] + f" Edit {n}.")
            write_jsonl(corpus, docs)
            quiver_run()
            time.sleep(1.0)  # the client's next queries open the new version
            memory = psutil.Process(server.pid).memory_info().rss / 2**20
            rss.append(memory)
            print(f"reindex {n + 1}: server RSS {memory:.0f} MiB, {tally['ok']} requests ok, "
                  f"{tally['failed']} failed", flush=True)
    finally:
        stop.set()
        thread.join(timeout=60)
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.reindexes} reindexes, {tally['ok'] + tally['failed']} requests, "
          f"{tally['failed']} failed; server RSS after the first reindex {rss[0]:.0f} MiB, "
          f"after the last {rss[-1]:.0f} MiB: {rss[-1] / rss[0]:.2f}x (goal <= 1.3x)")
    for err in tally["errors"][:5]:
        print("  error:", err)


if __name__ == "__main__":
    main()
