"""Object storage: a corpus read from, and a table written to, an S3-compatible server
(moto in server mode on 127.0.0.1), through pyarrow's and Lance's own file systems, with a
fault-injecting proxy in between: a failed upload is retried, a commit that keeps failing
fails the job with nothing half-committed, and the next run resumes to exact rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import lance
import pyarrow.fs as pafs
import pytest
from conftest import chunk_ids, free_port
from s3_fault_proxy import FaultProxy, Rule

from jobs._embed_job import rejects_uri, run_embed
from jobs.api import open_table
from operators.write import orphan_data_files
from schemas.spec import parse_spec

BUCKET = "quiver-test"


def _put(fragment: str):
    """Match uploads (PUT) whose path contains `fragment`."""
    return lambda method, path: method == "PUT" and fragment in path


@pytest.fixture(scope="module")
def moto_port():
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
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                           region="us-east-1", access_key="testing", secret_key="testing",
                           allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def proxy(moto_port):
    proxy = FaultProxy(moto_port)
    proxy.port = proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_options(proxy) -> dict[str, str]:
    """Storage options that route every request through the fault proxy; few retries so a
    persistent failure surfaces in seconds (Lance's default retries for minutes)."""
    return {"aws_endpoint": f"http://127.0.0.1:{proxy.port}", "allow_http": "true",
            "aws_region": "us-east-1", "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing", "client_max_retries": "3",
            "client_retry_timeout": "20"}


def _s3fs(options: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=options["aws_endpoint"].split("://")[1],
                             scheme="http", region="us-east-1", access_key="testing",
                             secret_key="testing")


def test_job_reads_and_writes_object_storage_through_failed_uploads(
        proxy, s3_options, stdlib_docs, tiny_model, ray_local) -> None:
    """One data-file upload and one commit answer 503 once: Lance retries both, and the
    table ends exact."""
    fs = _s3fs(s3_options)
    lines = [json.dumps({"id": d["id"], "text": d["text"]}) for d in stdlib_docs[:12]]
    lines.insert(3, "{oops")
    with fs.open_output_stream(f"{BUCKET}/in/corpus.jsonl") as f:
        f.write(("\n".join(lines) + "\n").encode())

    table = f"s3://{BUCKET}/tables/docs.lance"
    proxy.rules = [Rule(_put("/tables/docs.lance/data/")),
                   Rule(_put("/tables/docs.lance/_versions/"))]
    spec = parse_spec({
        "kind": "embed",
        "source": {"uri": f"s3://{BUCKET}/in/corpus.jsonl", "id_field": "id",
                   "records_per_shard": 5, "storage_options": s3_options},
        "table": table, "model": {"name": tiny_model},  # faults, not embeddings
        "write": {"storage_options": s3_options},
    })
    summary = run_embed(spec)
    assert summary.documents == 12 and summary.rejects == 1
    assert proxy.injected() == 2  # both faults really hit the write path

    ds = lance.dataset(table, storage_options=s3_options)
    doc_ids = set(ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist())
    assert doc_ids == {d["id"] for d in stdlib_docs[:12]}
    assert ds.count_rows() == summary.chunks
    rejects = lance.dataset(rejects_uri(table), storage_options=s3_options).to_table()
    assert rejects.column("position").to_pylist() == [4]

    hits = open_table(table, storage_options=s3_options).search(stdlib_docs[0]["text"][:200],
                                                                k=1)
    assert hits[0].doc_id == stdlib_docs[0]["id"]


def test_commit_that_keeps_failing_fails_cleanly_then_resumes(
        proxy, s3_options, stdlib_docs, model_info, tiny_model, ray_local) -> None:
    """Every commit after the first answers 503 until Lance gives up: the job fails with
    only its first commit visible, and the next run resumes from it, removes the data files
    the failed commit left, and ends with exact rows."""
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[12:27]]
    fs = _s3fs(s3_options)
    with fs.open_output_stream(f"{BUCKET}/in/resume.jsonl") as f:
        f.write(("\n".join(json.dumps(d) for d in docs) + "\n").encode())
    table = f"s3://{BUCKET}/tables/resume.lance"
    # Lance names version v as u64::MAX - v; version 1 is the empty table the job creates,
    # version 2 its first checkpoint
    allowed = tuple(f"/_versions/{2**64 - 1 - v}.manifest" for v in (1, 2))
    proxy.rules = [Rule(lambda m, p: m == "PUT" and "/resume.lance/_versions/" in p
                        and not p.endswith(allowed), times=None)]
    spec = parse_spec({
        "kind": "embed",
        "source": {"uri": f"s3://{BUCKET}/in/resume.jsonl", "id_field": "id",
                   "records_per_shard": 5, "storage_options": s3_options},
        "table": table, "model": {"name": tiny_model},
        "write": {"storage_options": s3_options, "shards_per_commit": 1},
    })
    with pytest.raises(Exception) as failed:
        run_embed(spec)
    assert "503" in str(failed.value) or "SlowDown" in str(failed.value), failed.value
    assert proxy.injected() >= 2  # the second commit was tried again before giving up

    ds = lance.dataset(table, storage_options=s3_options)
    assert ds.version == 2  # the failed commit left no version behind
    first = ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist()
    assert set(first) == {d["id"] for d in docs[:5]}  # one whole shard, nothing more
    assert orphan_data_files(ds, s3_options)  # the failed commit's uploaded fragments

    proxy.rules = []
    summary = run_embed(spec)
    assert summary.shards_skipped == 1
    ds = lance.dataset(table, storage_options=s3_options)
    ids = ds.to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == chunk_ids(model_info, docs)  # none lost, none twice
    assert not orphan_data_files(ds, s3_options)


def test_the_table_lease_on_s3_is_a_conditional_write(moto_port) -> None:
    """On S3 the lease object is created with If-None-Match and replaced with If-Match:
    a second run is refused while the first beats, a racing writer that read the same
    version loses, a dead holder is taken over at the next epoch, and the stalled holder
    then cannot pass its pre-commit check."""
    from operators.lease import Lease, LeaseHeldError, LeaseLostError, LeaseRecord, _S3Store

    options = {"aws_endpoint": f"http://127.0.0.1:{moto_port}", "allow_http": "true",
               "aws_region": "us-east-1", "aws_access_key_id": "testing",
               "aws_secret_access_key": "testing"}
    uri = f"s3://{BUCKET}/lease-{time.time_ns()}/t.lance"
    first = Lease.acquire(uri, options)
    with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}"):
        Lease.acquire(uri, options)
    store = _S3Store(uri, options)
    held, token = store.read()
    assert held.epoch == 1
    store.swap(LeaseRecord(**{**held.__dict__, "heartbeat": held.heartbeat - 1}), token)
    from operators.lease import _Conflict

    with pytest.raises(_Conflict):  # a second writer that read the same version loses
        store.swap(LeaseRecord(**{**held.__dict__, "holder": "racer"}), token)
    time.sleep(0.3)
    taker = Lease.acquire(uri, options, timeout_s=0.2)  # first's beat is over 0.2 s old
    assert taker.record.epoch == 2 and taker.previous.holder == first.record.holder
    with pytest.raises(LeaseLostError):
        first.check()
    taker.release()
    again = Lease.acquire(uri, options)
    assert again.record.epoch == 3  # epochs only rise, across releases too
    again.release()


def test_cli_commands_and_the_server_on_an_s3_warehouse(moto_port, tiny_model, ray_local,
                                                        tmp_path) -> None:
    """`--storage-option` reaches a table on S3 for info, query and the table commands
    (a delete there takes the S3 lease), and `quiver serve` lists and searches an
    s3:// warehouse."""
    import urllib.request

    from conftest import start_server, write_jsonl
    from typer.testing import CliRunner

    from jobs.cli import app

    options = {"aws_endpoint": f"http://127.0.0.1:{moto_port}", "allow_http": "true",
               "aws_region": "us-east-1", "aws_access_key_id": "testing",
               "aws_secret_access_key": "testing"}
    prefix = f"s3://{BUCKET}/warehouse-{time.time_ns()}"
    docs = [{"id": f"d{i}", "text": f"document {i} about topic {i % 3}"} for i in range(12)]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    run_embed(parse_spec({"kind": "embed", "table": f"{prefix}/docs.lance",
                          "model": {"name": tiny_model},
                          "source": {"uri": str(corpus), "id_field": "id"},
                          "write": {"storage_options": options}}))
    flags = [x for k, v in options.items() for x in ("--storage-option", f"{k}={v}")]
    runner = CliRunner()

    def cli(*args: str) -> dict:
        result = runner.invoke(app, [*args, *flags, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    table = f"{prefix}/docs.lance"
    assert cli("info", table)["rows"] == 12
    assert len(cli("query", table, "topic 1", "-k", "3")["hits"]) == 3
    assert cli("table", "stats", table)["rows"] == 12
    profile = tmp_path / "store.yaml"  # the same options from a profile file
    profile.write_text("".join(f"{k}: {v!r}\n" for k, v in options.items()))
    via_profile = runner.invoke(app, ["table", "stats", table, "-S", f"@{profile}", "--json"],
                                catch_exceptions=False)
    assert via_profile.exit_code == 0 and json.loads(via_profile.stdout)["rows"] == 12
    deleted = cli("table", "delete", table, "--doc-id", "d3")
    assert deleted["chunks_deleted"] == 1 and deleted["version"] == deleted["version_before"] + 1
    assert cli("info", table)["rows"] == 11
    assert "current" in cli("table", "tags", table)["tags"]
    bad = runner.invoke(app, ["info", table, "--storage-option", "no-equals-sign"])
    assert bad.exit_code != 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc, base = start_server(prefix, env, extra=flags)
    try:
        with urllib.request.urlopen(f"{base}/tables", timeout=30) as resp:
            assert json.load(resp)["tables"] == ["docs"]
        request = urllib.request.Request(
            f"{base}/tables/docs/search", data=json.dumps({"query": "topic 2", "k": 4})
            .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            hits = json.load(resp)["hits"]
        assert len(hits) == 4 and all(h["doc_id"] != "d3" for h in hits)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
