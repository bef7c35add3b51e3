"""Two-phase writes: fragments are invisible until one commit names its shards."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
from lance.dataset import Transaction

from operators.write import commit, committed_shards, has_committed, write_fragments

SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("vector", pa.list_(pa.float32(), 4))],
                   metadata={b"quiver.manifest": b"{}"})


def _rows(ids: list[str]) -> pa.Table:
    flat = pa.array(np.arange(4 * len(ids), dtype=np.float32))
    return pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(flat, 4),
                     "_tokens": pa.array([1] * len(ids), pa.int32())})


def test_fragments_are_invisible_until_committed(tmp_path: Path) -> None:
    uri = str(tmp_path / "t.lance")
    first = write_fragments(_rows(["a", "b"]), uri, schema=SCHEMA)
    ds = commit(uri, first, mode="create", schema=SCHEMA, job="J", shards=["s1"])
    pending = write_fragments(_rows(["c"]), uri, schema=SCHEMA)
    assert lance.dataset(uri).count_rows() == 2  # written, not committed: not visible
    ds = commit(uri, pending, mode="append", schema=SCHEMA, read_version=ds.version, job="J",
                shards=["s2"])
    assert sorted(lance.dataset(uri).to_table().column("id").to_pylist()) == ["a", "b", "c"]
    assert lance.dataset(uri).schema.metadata[b"quiver.manifest"] == b"{}"
    assert "_tokens" not in lance.dataset(uri).schema.names


def test_committed_shards_follow_the_job_through_index_commits(tmp_path: Path) -> None:
    uri = str(tmp_path / "t.lance")
    ds = commit(uri, write_fragments(_rows(["a"]), uri, schema=SCHEMA), mode="create",
                schema=SCHEMA, job="J", shards=["s1", "s2"])
    ds = commit(uri, [], mode="append", schema=SCHEMA, read_version=ds.version, job="J",
                shards=["s1", "s2", "s3"])
    ds.create_scalar_index("id", "BTREE")
    ds = lance.dataset(uri)
    assert committed_shards(ds, job="J") == {"s1", "s2", "s3"}
    assert committed_shards(ds, job="other") == set()
    # Restoring the first version brings back its shard set, not the later one.
    lance.dataset(uri, version=1).restore()
    assert committed_shards(lance.dataset(uri), job="J") == {"s1", "s2"}
    # An overwrite by another job hides everything before it.
    commit(uri, write_fragments(_rows(["z"]), uri, schema=SCHEMA), mode="create",
           schema=SCHEMA, job="K", shards=["k1"])
    ds = lance.dataset(uri)
    assert committed_shards(ds, job="J") == set()
    assert committed_shards(ds, job="K") == {"k1"}


def test_a_commits_shard_label_stays_small_and_reads_back_exactly(tmp_path: Path) -> None:
    """20,000 shards of 8 units in one commit: the label is runs, not 20,000 names, and a
    commit written by an older Quiver (a plain JSON list) still resumes."""
    import json

    from operators.sources.plan import shard_id_for
    from operators.write import JOB_KEY, SHARDS_KEY
    from schemas.source import SourceFile, Unit

    units = [Unit(index=n, kind="jsonl",
                  file=SourceFile(path=f"part-{n}.jsonl.gz", size=1, mtime_ns=None))
             for n in range(8)]
    shards = {shard_id_for(u, 10 * s) for u in units for s in range(2_500)}
    shards.add(shard_id_for(units[0], 123_457))  # off the stride: a run of its own
    uri = str(tmp_path / "t.lance")
    ds = commit(uri, write_fragments(_rows(["a"]), uri, schema=SCHEMA), mode="create",
                schema=SCHEMA, job="J", shards=shards)
    label = ds.read_transaction(ds.version).transaction_properties[SHARDS_KEY]
    assert len(label) < 1_000 < len(json.dumps(sorted(shards)))
    assert committed_shards(ds, job="J") == shards
    old = lance.LanceDataset.commit(uri, Transaction(
        ds.version, lance.LanceOperation.Append(
            write_fragments(_rows(["b"]), uri, schema=SCHEMA)),
        transaction_properties={JOB_KEY: "J", SHARDS_KEY: json.dumps(["legacy:x"])}))
    assert committed_shards(old, job="J") == shards | {"legacy:x"}


def test_has_committed_reads_the_log_only_back_to_the_jobs_latest_commit(
        tmp_path: Path) -> None:
    uri = str(tmp_path / "t.lance")
    ds = commit(uri, write_fragments(_rows(["a"]), uri, schema=SCHEMA), mode="create",
                schema=SCHEMA, job="J", shards=["s1"])
    for n in range(2, 6):
        ds = commit(uri, write_fragments(_rows([f"r{n}"]), uri, schema=SCHEMA),
                    mode="append", schema=SCHEMA, read_version=ds.version, job="J",
                    shards=[f"s{n}"])
    ds = lance.dataset(uri)
    read: list[int] = []
    real = ds.read_transaction
    ds.read_transaction = lambda v: read.append(v) or real(v)  # count what each walk reads
    assert has_committed(ds, job="J") and read == [5]
    read.clear()
    assert committed_shards(ds, job="J") == {f"s{n}" for n in range(1, 6)}
    assert read == [5, 4, 3, 2, 1]
    read.clear()
    assert not has_committed(ds, job="other") and read == [5]  # another job's commit ends it


def test_a_commit_refuses_when_another_writer_moved_the_table(tmp_path: Path) -> None:
    import pytest

    from schemas.errors import ConcurrentWriteError

    uri = str(tmp_path / "t.lance")
    ds = commit(uri, write_fragments(_rows(["a"]), uri, schema=SCHEMA), mode="create",
                schema=SCHEMA, job="J", shards=["s1"], expect_latest=0)
    seen = ds.version
    mine = write_fragments(_rows(["b"]), uri, schema=SCHEMA)
    # A second run of the same job appends the same shard meanwhile.
    commit(uri, write_fragments(_rows(["b"]), uri, schema=SCHEMA), mode="append",
           schema=SCHEMA, read_version=seen, job="J", shards=["s1", "s2"], expect_latest=seen)
    with pytest.raises(ConcurrentWriteError, match="another writer committed version 2"):
        commit(uri, mine, mode="append", schema=SCHEMA, read_version=seen, job="J",
               shards=["s1", "s2"], expect_latest=seen)
    assert sorted(lance.dataset(uri).to_table().column("id").to_pylist()) == ["a", "b"]
    with pytest.raises(ConcurrentWriteError, match="it last saw no table"):
        commit(uri, [], mode="create", schema=SCHEMA, job="K", shards=[], expect_latest=0)


def test_write_sets_share_whole_shards_and_keep_cut_ones_apart(tmp_path) -> None:
    """A batch holding shards a and b whole and only part of c: a and b share one set
    of fragments, c has its own; with shards_per_set=1 each shard has its own set. The
    counts per shard are what the driver needs to tell complete shards."""
    from jobs._lance_io import write_shard_fragments

    schema = pa.schema([("id", pa.string())])
    batch = pa.table({
        "id": ["a#0", "a#1", "b#0", "c#0"],
        "_shard": ["a", "a", "b", "c"], "_shard_docs": pa.array([1, 1, 1, 2], pa.int64()),
        "_doc_chunks": pa.array([2, 2, 1, 1], pa.int64()), "_first": [True, False, True, True],
        "_tokens": pa.array([3, 3, 3, 3], pa.int64()),
        "_truncated_tokens": pa.array([0, 0, 0, 0], pa.int64())})
    uri = str(tmp_path / "t.lance")
    for per_set, sets in ((None, [["a", "b"], ["c"]]), (3, [["a", "b"], ["c"]]),
                          (1, [["a"], ["b"], ["c"]])):
        out = write_shard_fragments(batch, uri=uri, schema=schema, max_rows_per_file=100,
                                    storage_options={}, shards_per_set=per_set).to_pylist()
        by_write: dict[str, list[str]] = {}
        for row in out:
            by_write.setdefault(row["write"], []).append(row["shard"])
        assert sorted(by_write.values()) == sets
        assert [r["fragments"] is not None for r in out] == \
            [row["shard"] == by_write[row["write"]][0] for row in out]
        counts = {r["shard"]: (r["rows"], r["firsts"], r["first_chunks"], r["shard_docs"])
                  for r in out}
        assert counts == {"a": (2, 1, 2, 1), "b": (1, 1, 1, 1), "c": (1, 1, 1, 2)}
        assert sum(r["tokens"] or 0 for r in out) == 12
