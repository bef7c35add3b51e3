"""Object storage: a corpus read from, and a table written to, an S3-compatible server
(moto in server mode on 127.0.0.1), through pyarrow's and Lance's own file systems."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import lance
import pyarrow.fs as pafs
import pytest
from conftest import free_port

from jobs._embed_job import rejects_uri, run_embed
from jobs.api import open_table
from schemas.spec import parse_spec

BUCKET = "quiver-test"


@pytest.fixture(scope="module")
def s3_options():
    pytest.importorskip("moto")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    options = {"aws_endpoint": f"http://127.0.0.1:{port}", "allow_http": "true",
               "aws_region": "us-east-1", "aws_access_key_id": "testing",
               "aws_secret_access_key": "testing"}
    yield options
    proc.terminate()
    proc.wait(timeout=10)


def test_job_reads_and_writes_object_storage(s3_options, stdlib_docs, ray_local) -> None:
    fs = pafs.S3FileSystem(endpoint_override=s3_options["aws_endpoint"].split("://")[1],
                           scheme="http", region="us-east-1", access_key="testing",
                           secret_key="testing", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    lines = [json.dumps({"id": d["id"], "text": d["text"]}) for d in stdlib_docs[:12]]
    lines.insert(3, "{oops")
    with fs.open_output_stream(f"{BUCKET}/in/corpus.jsonl") as f:
        f.write(("\n".join(lines) + "\n").encode())

    table = f"s3://{BUCKET}/tables/docs.lance"
    spec = parse_spec({
        "kind": "embed",
        "source": {"uri": f"s3://{BUCKET}/in/corpus.jsonl", "id_field": "id",
                   "records_per_shard": 5, "storage_options": s3_options},
        "table": table,
        "write": {"storage_options": s3_options},
    })
    summary = run_embed(spec)
    assert summary.documents == 12 and summary.rejects == 1

    ds = lance.dataset(table, storage_options=s3_options)
    doc_ids = set(ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist())
    assert doc_ids == {d["id"] for d in stdlib_docs[:12]}
    assert ds.count_rows() == summary.chunks
    rejects = lance.dataset(rejects_uri(table), storage_options=s3_options).to_table()
    assert rejects.column("position").to_pylist() == [4]

    hits = open_table(table, storage_options=s3_options).search(stdlib_docs[0]["text"][:200],
                                                                k=1)
    assert hits[0].doc_id == stdlib_docs[0]["id"]
