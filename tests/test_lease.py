"""The table lease: one writing run per table, dead holders taken over, stalled holders
kept from committing, and orphan removal limited to what no live run can still commit."""

from __future__ import annotations

import json
import os
import socket
import time

import lance
import pyarrow as pa
import pytest

from operators.lease import Lease, LeaseHeldError, LeaseLostError, LeaseRecord
from operators.write import commit, orphan_data_files, remove_orphans, write_fragments


def _lease_file(table) -> str:
    return str(table.parent / f".{table.name}.lease.json")


def _pretend_held(table, *, heartbeat: float, epoch: int, pid: int = 4242) -> None:
    """Write a lease as another run on another host would have left it."""
    record = LeaseRecord("someone-else", "other-host", pid, heartbeat - 30, heartbeat, epoch,
                         boot="another-boot")
    with open(_lease_file(table), "w") as f:
        json.dump(record.__dict__, f)


def test_a_second_run_is_refused_with_the_holder_named(tmp_path) -> None:
    table = tmp_path / "t.lance"
    first = Lease.acquire(str(table), purpose="a quiver run of c.jsonl")
    with pytest.raises(LeaseHeldError) as err:
        Lease.acquire(str(table))
    said = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in said and "since 20" in said
    assert "quiver run --wait" in said
    first.release()
    second = Lease.acquire(str(table))  # released: free again, next epoch
    assert second.record.epoch == 2 and second.previous is None
    second.release()


def test_a_silent_holder_is_taken_over_and_the_table_fenced(tmp_path) -> None:
    """A holder on another machine whose lease stays unchanged for the timeout, as this
    run watches it, is dead: the lease goes to the next run at the next epoch, which
    fences the table, so even the files the silent holder wrote last can go (no late
    commit of its can ever reference them)."""
    table = tmp_path / "t.lance"
    schema = pa.schema([("id", pa.string())])
    lance.write_dataset(pa.table({"id": ["a"]}, schema=schema), str(table))
    written = [write_fragments(pa.table({"id": [x]}, schema=schema), str(table),
                               schema=schema) for x in "bc"]
    assert all(written) and len(orphan_data_files(lance.dataset(str(table)))) == 2
    _pretend_held(table, heartbeat=time.time(), epoch=7)
    with pytest.raises(LeaseHeldError, match="pid 4242 on other-host"):
        Lease.acquire(str(table), timeout_s=3600)  # looks alive: refused at once
    _pretend_held(table, heartbeat=time.time() - 3600, epoch=7)
    with Lease.acquire(str(table), timeout_s=0.3) as lease:  # watched 0.3 s, unchanged
        assert lease.record.epoch == 8 and lease.previous.epoch == 7
        assert lance.dataset(str(table)).version == 3  # the fence: a Restore, a config
        assert remove_orphans(lance.dataset(str(table)),
                              older_than=lease.orphans_before()) == 2
    assert orphan_data_files(lance.dataset(str(table))) == []


@pytest.mark.parametrize("skew_s", [120.0, -120.0])
def test_a_live_holder_with_a_skewed_clock_is_never_taken_over(tmp_path, skew_s) -> None:
    """The holder's clock is 120 s ahead of ours, or behind (its heartbeat then looks 120 s
    old, which a clock comparison takes for dead). While it beats, the lease changes under
    the watcher's eyes and is never taken over; once it stops, it is."""
    table = tmp_path / "t.lance"
    lance.write_dataset(pa.table({"id": ["a"]}), str(table))
    holder = Lease.acquire(str(table), heartbeat_s=0.05, clock=lambda: time.time() + skew_s)
    try:
        with pytest.raises(LeaseHeldError):
            Lease.acquire(str(table), timeout_s=0.5)  # ahead: looks fresh, refused at once
        with pytest.raises(LeaseHeldError):
            # behind: looks stale, so it is watched; it changes, so it is alive
            Lease.acquire(str(table), timeout_s=0.5, wait=False)
        holder.check()  # still the holder
        holder._stop.set()  # it stalls: no more heartbeats
        holder._beat.join()
        taker = Lease.acquire(str(table), timeout_s=0.5, wait=True)
        assert taker.record.epoch == holder.record.epoch + 1
        with pytest.raises(LeaseLostError):
            holder.check()
        taker.release()
    finally:
        holder.release()


def test_a_holder_in_another_pid_namespace_is_not_declared_dead(tmp_path) -> None:
    """Same host name and boot id, but another container's PID namespace: its pid means
    nothing here, so it is not known to have exited, whatever `kill(pid, 0)` says."""
    from operators.lease import LeaseRecord, _boot_id, _pid_namespace

    mine = LeaseRecord("h", socket.gethostname(), 999_999_999, 0.0, 0.0, 1, "", _boot_id(),
                       _pid_namespace())
    assert mine.exited()  # this namespace, no such pid: gone
    assert not LeaseRecord(**{**mine.__dict__, "pidns": "pid:[4026531836]x"}).exited()
    assert not LeaseRecord(**{**mine.__dict__, "pidns": ""}).exited()  # unknown: waits


def test_a_stalled_holder_that_was_taken_over_commits_nothing(tmp_path) -> None:
    """Run A stalls past the timeout; run B takes the lease over and fences the table. A's
    next commit fails at its lease check; and the commits of an A that had passed its
    check before the takeover (the window a GC pause or a SIGSTOP leaves) are refused by
    Lance itself: an append, a reindex's update, a compaction and `mark_finished`."""
    from lance.commit import CommitConflictError
    from lance.optimize import Compaction, CompactionOptions

    from operators.lease import EPOCH_KEY
    from operators.write import _commit, mark_finished

    table = tmp_path / "t.lance"
    schema = pa.schema([("id", pa.string())])
    lance.write_dataset(pa.table({"id": ["a", "c"]}, schema=schema), str(table))
    lance.write_dataset(pa.table({"id": ["b"]}, schema=schema), str(table), mode="append")
    stalled = Lease.acquire(str(table))
    seen = lance.dataset(str(table))  # what A read: version 2
    rows = write_fragments(pa.table({"id": ["x"]}, schema=schema), str(table), schema=schema)
    gone = seen.get_fragments()[0].delete("id = 'a'")
    compacted = [t.execute(seen) for t in Compaction.plan(seen, CompactionOptions()).tasks]
    time.sleep(0.2)
    taker = Lease.acquire(str(table), timeout_s=0.1)  # A's heartbeat is 0.2 s old
    assert taker.record.epoch == stalled.record.epoch + 1
    fenced = lance.dataset(str(table))
    assert fenced.version == 4 and fenced.config()[EPOCH_KEY] == str(taker.record.epoch)
    with pytest.raises(LeaseLostError, match="was taken over"):
        commit(str(table), rows, mode="append", schema=schema, read_version=2, job="j",
               shards=["s"], lease=stalled)
    late = dict(schema=schema, read_version=2, job="j", shards=["s"], storage_options=None,
                removed_fragment_ids=[], updated_fragments=[])
    with pytest.raises(CommitConflictError):
        _commit(str(table), rows, mode="append", **late)
    with pytest.raises(CommitConflictError):
        _commit(str(table), rows, mode="update", **{**late, "updated_fragments": [gone]})
    with pytest.raises((CommitConflictError, OSError), match="ncompatible"):
        Compaction.commit(seen, compacted)
    with pytest.raises(CommitConflictError):
        mark_finished(seen, job="j", epoch=stalled.record.epoch)
    after = lance.dataset(str(table))
    assert after.version == 4 and sorted(after.to_table().column("id").to_pylist()) == \
        ["a", "b", "c"]
    stalled.release()  # a lost lease is not released on the new holder's behalf
    with pytest.raises(LeaseHeldError):
        Lease.acquire(str(table))
    commit(str(table), rows, mode="append", schema=schema, read_version=4, job="j",
           shards=["s"], lease=taker)
    assert lance.dataset(str(table)).count_rows() == 4
    taker.release()


def test_object_stores_without_conditional_writes_are_refused(tmp_path) -> None:
    from schemas.errors import TableError

    with pytest.raises(TableError, match="gs:// has none yet"):
        Lease.acquire("gs://bucket/t.lance")


def test_a_holder_on_this_machine_that_exited_is_taken_over_at_once(tmp_path) -> None:
    """A killed driver on this machine leaves a fresh heartbeat but no process: its rerun
    takes the lease at once, and every orphan may go (nothing of the dead run is in
    flight)."""
    import subprocess
    import sys

    from operators.lease import _boot_id, _pid_namespace

    table = tmp_path / "t.lance"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    record = LeaseRecord("killed-run", socket.gethostname(), pid, time.time(), time.time(),
                         3, boot=_boot_id(), pidns=_pid_namespace())
    with open(_lease_file(table), "w") as f:
        json.dump(record.__dict__, f)
    with Lease.acquire(str(table)) as lease:
        assert lease.record.epoch == 4 and lease.previous.pid == pid
        assert lease.orphans_before() >= record.heartbeat


def test_a_holder_that_lost_its_lease_moves_no_tag(tmp_path) -> None:
    """A tag is no Lance transaction, so no fence reaches it: the `current` tag is moved
    only after a lease check, and a run that was taken over leaves it alone."""
    from jobs._cutover import cut_over
    from jobs._tags import CURRENT_TAG, current_version

    table = tmp_path / "t.lance"
    lance.write_dataset(pa.table({"id": ["a"]}), str(table))
    stalled = Lease.acquire(str(table))
    time.sleep(0.2)
    taker = Lease.acquire(str(table), timeout_s=0.1)  # fences: the table moves on
    with pytest.raises(LeaseLostError, match="was taken over"):
        cut_over(lance.dataset(str(table)), None, lease=stalled)
    assert CURRENT_TAG not in lance.dataset(str(table)).tags.list()
    latest = lance.dataset(str(table))
    cut_over(latest, None, lease=taker)
    assert current_version(lance.dataset(str(table))) == latest.version
    stalled.release()
    taker.release()


def test_a_holder_that_lost_its_lease_starts_no_cluster_index_build(tmp_path) -> None:
    """Lance-ray opens the latest version again before it commits an index, so no fence
    refuses its builds: the cluster builder checks the lease before each one, and a run
    that was taken over starts none (it fails before any Ray work)."""
    from jobs._index import ClusterBuilder

    table = tmp_path / "t.lance"
    vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.0, 1.0, 1.0, 0.0], pa.float32()), 2)
    lance.write_dataset(pa.table({"id": ["a", "b"], "v": vectors}), str(table))
    stalled = Lease.acquire(str(table))
    builder = ClusterBuilder(2, {}, lease=stalled)
    time.sleep(0.2)
    taker = Lease.acquire(str(table), timeout_s=0.1)
    ds = lance.dataset(str(table))
    with pytest.raises(LeaseLostError, match="was taken over"):
        builder.vector(ds, "v", index_type="IVF_FLAT", metric="l2",
                       params={"num_partitions": 1})
    with pytest.raises(LeaseLostError, match="was taken over"):
        builder.scalar(ds, "id", "BTREE")
    assert lance.dataset(str(table)).list_indices() == []
    stalled.release()
    taker.release()
