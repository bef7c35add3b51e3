"""Two-phase writes: fragments are invisible until one commit names its shards."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from operators.write import commit, committed_shards, write_fragments

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
