"""Exactly-once under faults: an embed actor killed mid-job, the driver killed with
SIGKILL at several points then run again, two jobs on one table, and a worker node of a
two-node cluster on 127.0.0.1 removed mid-job. Every run must end with exactly one row per
expected chunk id, and a resumed run must leave no uncommitted data files behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lance
import pytest
from conftest import REPO, chunk_ids, loopback_cluster, write_jsonl

from jobs._embed_job import run_embed
from jobs._embed_service import EARLY_ENV
from operators.write import orphan_data_files
from schemas.spec import parse_spec

N_DOCS = 60


@pytest.fixture(scope="module")
def docs(stdlib_docs) -> list[dict]:
    return [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:N_DOCS]]


def _spec_dict(corpus: Path, table: Path) -> dict:
    return {"kind": "embed", "table": str(table),
            "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 5},
            "write": {"shards_per_commit": 2, "keep_checkpoints": True},
            "compute": {"rows_per_batch": 16}}


def _version(table: Path) -> int:
    """Commits since the job created the table: 0 before the first checkpoint (data
    files may exist). The job creates a new table empty, as version 1."""
    try:
        return lance.dataset(str(table)).version - 1
    except ValueError:
        return 0


def _ids(table: Path) -> list[str]:
    return sorted(lance.dataset(str(table)).to_table(columns=["id"]).column("id").to_pylist())


def _embed_actor_pids() -> list[int]:
    """Embed actors of this process's own Ray (its workers are our descendants): the
    pool's (`MapBatches(MeteredEmbedder)`) or a small run's early one (`KeptEmbedder`)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if "Embedder)" in cmdline or "KeptEmbedder" in cmdline:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.parametrize("early", ["0", "1"], ids=["pool", "early-actor"])
def test_embed_actor_killed_mid_job(docs, model_info, tmp_path, ray_local, monkeypatch,
                                    early: str) -> None:
    """A SIGKILLed embed actor, twice: the pool's (Ray Data restarts it) or the one a
    small run started while planning (Ray restarts it and retries its block)."""
    monkeypatch.setenv(EARLY_ENV, early)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(
        summary=run_embed(parse_spec(_spec_dict(corpus, table)))))
    chunks_of: dict[str, int] = {}
    for chunk in chunk_ids(model_info, docs):
        chunks_of[chunk.rsplit("#", 1)[0]] = chunks_of.get(chunk.rsplit("#", 1)[0], 0) + 1
    torn: list[str] = []
    reads = [0]
    stop = threading.Event()

    def read_loop() -> None:  # a reader querying while the job writes
        while not stop.is_set():
            if _version(table):
                ids = lance.dataset(str(table)).to_table(columns=["id"]).column("id")
                ids = ids.to_pylist()
                reads[0] += 1
                per_doc: dict[str, int] = {}
                for chunk in ids:
                    per_doc[chunk.rsplit("#", 1)[0]] = per_doc.get(chunk.rsplit("#", 1)[0], 0) + 1
                if len(ids) != len(set(ids)) or any(n != chunks_of.get(d)
                                                    for d, n in per_doc.items()):
                    torn.append(f"{len(ids)} rows: a chunk twice or a document in part")
            time.sleep(0.1)

    reader = threading.Thread(target=read_loop)
    reader.start()
    job.start()
    killed = 0
    deadline = time.monotonic() + 300
    while job.is_alive() and time.monotonic() < deadline and killed < 2:
        committed = _version(table)
        actors = _embed_actor_pids()
        if actors and committed >= 1 + 2 * killed:  # once after checkpoint 1, once later
            os.kill(actors[0], signal.SIGKILL)
            killed += 1
        time.sleep(0.5)
    job.join(600)
    stop.set()
    reader.join()
    assert killed >= 1, "the job ended before an actor could be killed"
    # Every read saw whole documents, each chunk once: a committed prefix of the shards.
    assert reads[0] >= 1 and not torn, torn[:3]
    assert "summary" in result, "the job did not survive the killed actor"
    assert result["summary"].profile["actor_early"] == (early == "1")
    assert result["summary"].model_loads >= 2  # the killed one and its successor
    ids = _ids(table)
    assert ids == chunk_ids(model_info, docs) and len(set(ids)) == len(ids)


def _quiver_run(spec: Path, env: dict[str, str]) -> subprocess.Popen:
    """`quiver run SPEC --json` as its own process (and its own private Ray)."""
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_jobs_writing_one_table_at_once(docs, model_info, tmp_path, ray_local) -> None:
    """Two `quiver run` processes of one job on one table, started together: whichever
    commits second fails with a clear error and commits nothing; no version ever holds a
    chunk twice; the survivor finishes the table, and running the loser again finds
    nothing left to do."""
    docs = docs[:30]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(_spec_dict(corpus, table)))  # 6 shards, 3 checkpoints
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    runs = [_quiver_run(spec, env) for _ in range(2)]
    outcomes = [(proc.wait(600), *proc.communicate()) for proc in runs]
    failed = [err for code, _, err in outcomes if code != 0]
    # The job outlasts a process start-up, so exactly one run gets the lease; the other
    # is refused at once, before any work, naming the run that writes.
    assert len(failed) == 1, [err[-2000:] for err in failed]
    assert "is being written by another run: pid" in failed[0], failed[0][-3000:]
    ds = lance.dataset(str(table))
    expected = chunk_ids(model_info, docs)
    for v in ds.versions():  # every version is whole: each chunk at most once
        ids = lance.dataset(str(table), version=v["version"]).to_table(
            columns=["id"]).column("id").to_pylist()
        assert len(ids) == len(set(ids)) and set(ids) <= set(expected)
    assert _ids(table) == expected
    again = run_embed(parse_spec(_spec_dict(corpus, table)))  # the loser, run again
    assert again.shards_skipped == 6 and _ids(table) == expected


def overlapping_run(corpus: Path, table: str, workdir: Path, *, wait: bool,
                    storage_options: dict | None = None) -> dict:
    """Run A of a spec; as soon as A has committed its first checkpoint, start run B of
    the same spec (`--wait` or not). Returns what happened: B's exit code and stderr,
    A's, every row of the table readable afterwards (no missing file), and the table's
    ids. (`benchmarks/overlap.py` repeats it.)"""
    spec = workdir / f"spec-{time.time_ns()}.json"
    spec_dict = _spec_dict(corpus, table)
    if storage_options:
        spec_dict["write"]["storage_options"] = storage_options
    spec.write_text(json.dumps(spec_dict))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    opts = storage_options or None
    first = _quiver_run(spec, env)
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        try:
            if lance.dataset(str(table), storage_options=opts).version >= 1:
                break
        except ValueError:
            pass
        time.sleep(0.05)
    started_while_a_ran = first.poll() is None
    second = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json",
                               *(["--wait"] if wait else [])], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    b_out, b_err = second.communicate(timeout=900)
    a_out, a_err = first.communicate(timeout=900)
    ds = lance.dataset(str(table), storage_options=opts)
    rows = ds.to_table(columns=["id", "vector"])  # every data file is there
    return {"overlapped": started_while_a_ran, "a_code": first.returncode, "a_err": a_err,
            "b_code": second.returncode, "b_err": b_err, "b_out": b_out,
            "ids": sorted(rows.column("id").to_pylist())}


@pytest.mark.heavy  # CI's 30 minutes: `make test-heavy`; the lease's wait is in test_lease
def test_a_second_run_with_wait_waits_for_the_first(docs, model_info, tmp_path) -> None:
    """Run B of the same spec, with `--wait`, starts right after run A's first
    checkpoint: it waits for A, then finds the job done. A is never disturbed (no file of
    its is removed), and the table is exact. (B without `--wait` is refused at once:
    `test_two_jobs_writing_one_table_at_once`; `benchmarks/overlap.py` repeats both.)"""
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    expected = chunk_ids(model_info, docs)
    waited = overlapping_run(corpus, str(tmp_path / "b.lance"), tmp_path, wait=True)
    assert waited["overlapped"] and waited["a_code"] == 0 and waited["b_code"] == 0, \
        waited["b_err"][-3000:]
    assert "waiting for the table's lease" in waited["b_err"]
    summary = json.loads(waited["b_out"])
    assert summary["shards_skipped"] == summary["shards"]  # A had done it all
    assert waited["ids"] == expected


def test_driver_killed_at_several_points_then_resumed(stdlib_docs, model_info, tmp_path) -> None:
    """Each attempt is killed (driver and its Ray) right after it commits one more
    checkpoint, while later shards are written but not committed. 150 documents: with
    fewer, a fast machine commits the whole job within a second of its first commit."""
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:150]]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(_spec_dict(corpus, table)))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"]

    kills = []
    for _ in range(2):  # each attempt is killed once it has committed one more checkpoint
        target = _version(table) + 1
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if _version(table) >= target:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
                kills.append(_version(table))
                break
            time.sleep(0.05)
        proc.wait(60)
    assert len(kills) == 2, "the job finished before it could be killed twice"

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["shards_skipped"] >= 2  # committed checkpoints were not redone
    ids = _ids(table)
    assert ids == chunk_ids(model_info, docs) and len(set(ids)) == len(ids)
    assert orphan_data_files(lance.dataset(str(table))) == []


@pytest.mark.heavy  # 2+ minutes of a two-node cluster: `make test-heavy`, not CI's budget
def test_worker_node_removed_mid_job(docs, model_info, tmp_path) -> None:

    cluster, (worker,) = loopback_cluster(head={"num_cpus": 2, "include_dashboard": False},
                                          workers=[{"num_cpus": 1}])
    try:
        corpus = write_jsonl(tmp_path / "c.jsonl", docs)
        table = tmp_path / "t.lance"
        spec = tmp_path / "spec.yaml"
        spec.write_text(json.dumps(_spec_dict(corpus, table)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec), "--json"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and _version(table) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before the node could be removed"
        cluster.remove_node(worker)  # a third of the cluster's CPUs go away mid-job
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        ids = _ids(table)
        assert ids == chunk_ids(model_info, docs) and len(set(ids)) == len(ids)
    finally:
        cluster.shutdown()


def test_a_run_taken_over_just_before_its_first_checkpoint_commits_nothing(
        docs, tmp_path, ray_local, monkeypatch) -> None:
    """A run that makes a new table stalls just before its first checkpoint commit,
    while another run takes the table over and fences it. Lance refuses the late
    commit: the run creates the table empty and appends its checkpoints, which the
    fence conflicts with. (When the first checkpoint was an `Overwrite` that made the
    table, it landed over the fence and over a table the other run had made.)"""
    import pyarrow as pa
    from lance.commit import CommitConflictError

    import operators.write as write_module
    from operators.lease import fence

    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    real, fenced = write_module._commit, []

    def stalled_then_taken_over(uri, *args, **kwargs):
        if not fenced:  # the other run makes the table if this one has not yet
            if _version(table) == 0 and not (table / "_versions").exists():
                lance.write_dataset(pa.table({"id": ["theirs"]}), str(table), mode="create")
            fenced.append(fence(str(table), None, epoch=99))
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(write_module, "_commit", stalled_then_taken_over)
    with pytest.raises((CommitConflictError, OSError), match="ncompatible|onflict"):
        run_embed(parse_spec(_spec_dict(corpus, table)))
    after = lance.dataset(str(table))
    assert fenced and after.version == fenced[0]  # nothing of the run after the fence
    assert after.count_rows() == 0 and after.list_indices() == []


def test_a_run_that_failed_before_its_first_checkpoint_leaves_a_table_the_next_run_fills(
        docs, tmp_path, tiny_model, ray_local, monkeypatch) -> None:
    """A new table is created empty at the job's first commit, then appended to. A run
    that fails between the two leaves that empty table: the same job run again resumes
    on it (appends, fenced), and a job of another configuration replaces it (not a
    cut-over: there is nothing to keep)."""
    import operators.write as write_module

    corpus = write_jsonl(tmp_path / "c.jsonl", docs[:12])

    def spec(table: Path, **chunking) -> object:
        d = _spec_dict(corpus, table) | {"model": {"name": tiny_model}}
        return parse_spec(d | ({"chunking": chunking} if chunking else {}))

    def table_ids(table: Path) -> list[str]:
        ds = lance.dataset(str(table))
        return sorted(ds.to_table(columns=["id"]).column("id").to_pylist())

    def fail_first_checkpoint(table: Path, **chunking) -> None:
        def store_gone(*args, **kwargs):
            raise OSError("injected: the store went away")

        with monkeypatch.context() as m:
            m.setattr(write_module, "_commit", store_gone)
            with pytest.raises(OSError, match="injected"):
                run_embed(spec(table, **chunking))
        ds = lance.dataset(str(table))
        assert ds.version == 1 and ds.count_rows() == 0  # created, nothing committed

    reference = run_embed(spec(tmp_path / "ref.lance"))
    same = tmp_path / "same.lance"
    fail_first_checkpoint(same)
    again = run_embed(spec(same))
    assert again.shards_skipped == 0 and again.cutover is None
    assert table_ids(same) == table_ids(tmp_path / "ref.lance")
    assert len(table_ids(same)) == reference.chunks

    other = tmp_path / "other.lance"
    fail_first_checkpoint(other, max_tokens=64, overlap=8)
    replaced = run_embed(spec(other))  # another configuration than the failed run's
    assert replaced.cutover is None and table_ids(other) == table_ids(tmp_path / "ref.lance")


def test_a_run_taken_over_after_its_last_lease_check_builds_no_index(
        docs, model_info, tmp_path, ray_local, monkeypatch) -> None:
    """A run passes its last lease check, then stalls while another run takes the table
    over and fences it (here: the fence, committed as the run's end-of-job compaction
    returns). Its index builds and `mark_finished` run on the object it opened before the
    check, which moved only to its own commits, so Lance refuses them: nothing of it
    lands after the fence. (Opening the table again after compacting, as the job once
    did, built the indices on top of the fence.)"""
    from lance.commit import CommitConflictError

    import jobs._embed_job as job_module
    from operators.lease import fence

    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    table = tmp_path / "t.lance"
    real, fenced = job_module._compact, []

    def then_taken_over(ds, *args, **kwargs):
        report = real(ds, *args, **kwargs)
        fenced.append(fence(str(table), None, epoch=99))
        return report

    monkeypatch.setattr(job_module, "_compact", then_taken_over)
    with pytest.raises((CommitConflictError, OSError), match="ncompatible|onflict"):
        run_embed(parse_spec(_spec_dict(corpus, table)))
    after = lance.dataset(str(table))
    assert fenced and after.version == fenced[0]  # no commit of the run after the fence
    assert after.list_indices() == [] and "quiver.job_done" not in after.config()
    assert _ids(table) == chunk_ids(model_info, docs)  # the data is whole
