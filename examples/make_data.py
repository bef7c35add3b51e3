"""Write the small example corpora under examples/data/ (committed; rerun to refresh).

Forty modules of the Python standard library, one document each (the module docstring
and its public definitions' first paragraphs: real technical prose, PSF-licensed), in
each format Quiver reads: `.jsonl.gz`, a Parquet folder, CSV, and a folder of text files.

    python examples/make_data.py
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from jobs._demo import build_stdlib_corpus  # noqa: E402

MODULES = ["argparse", "base64", "bisect", "calendar", "collections", "colorsys", "csv",
           "difflib", "email", "fnmatch", "fractions", "ftplib", "getopt", "glob", "gzip",
           "hashlib", "heapq", "hmac", "html", "imaplib", "ipaddress", "json", "logging",
           "mailbox", "netrc", "operator", "pathlib", "pickle", "queue", "random", "sched",
           "secrets", "shlex", "shutil", "smtplib", "sqlite3", "statistics", "string",
           "tarfile", "zipfile"]
CATEGORY = {m: ("network" if m in {"email", "ftplib", "imaplib", "smtplib", "mailbox", "netrc"}
                else "data" if m in {"csv", "json", "pickle", "sqlite3", "tarfile", "zipfile",
                                     "gzip", "base64"} else "general") for m in MODULES}


def main() -> None:
    scratch = HERE / "data" / ".all.jsonl"
    build_stdlib_corpus(scratch)
    by_id = {r["id"]: r for r in map(json.loads, scratch.read_text().splitlines())}
    scratch.unlink()
    rows = [{"id": m, "title": by_id[m]["title"], "text": by_id[m]["text"][:1500],
             "category": CATEGORY[m], "definitions": by_id[m]["definitions"]}
            for m in MODULES if m in by_id]
    out = HERE / "data"
    with gzip.open(out / "stdlib.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "parquet").mkdir(exist_ok=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), out / "parquet" / f"part-{i}.parquet")
    with open(out / "stdlib.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "notes").mkdir(exist_ok=True)
    for r in rows[:12]:
        (out / "notes" / f"{r['id']}.txt").write_text(r["text"] + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} documents in 4 formats to {out}")


if __name__ == "__main__":
    main()
