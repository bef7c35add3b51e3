"""The records a plan leaves out by id (duplicates, excluded ids) stay off the driver:
its shards carry counts, and the tasks that read a shard fetch exactly its records from
the plan's `Skips`, in memory or from the files a saved plan names."""

from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from jobs._unchanged import STALE_SKIPS_S, drop_skips
from operators.sources.plan import plan_source
from operators.sources.read import read_shard
from operators.sources.rejects import with_duplicates
from operators.sources.skips import Skips, write_part
from schemas.errors import SourceChangedError
from schemas.spec import SourceSpec


def _corpus(root: Path) -> list[tuple[str, int, str]]:
    """Three files (one gzipped) whose ids repeat within and across files; returns every
    record as (file, line, id) in (file, line) order."""
    root.mkdir()
    records = []
    for f in range(3):
        rows = [{"id": f"d{(f * 11 + i * 7) % 23}", "text": f"file {f} line {i}"}
                for i in range(30)]
        name = f"part-{f}.jsonl" + (".gz" if f == 1 else "")
        opener = gzip.open if f == 1 else open
        with opener(root / name, "wt", encoding="utf-8") as out:
            out.write("".join(json.dumps(r) + "\n" for r in rows))
        records += [(str(root / name), i + 1, r["id"]) for i, r in enumerate(rows)]
    return records


def test_the_driver_holds_counts_and_readers_drop_exactly_the_left_out(tmp_path) -> None:
    records = _corpus(tmp_path / "src")
    first: dict[str, tuple[str, int]] = {}
    for path, line, doc_id in records:
        first.setdefault(doc_id, (path, line))
    excluded = ["d3", "d4"]
    source = SourceSpec(uri=str(tmp_path / "src"), id_field="id", records_per_shard=7)
    plan = plan_source(source, excluded=excluded)

    assert not any(s.skip for s in plan.shards)  # no record number on the driver
    gone = sum(1 for _, _, d in records if d in excluded)  # every record of an excluded id
    duplicates = len(records) - gone - len(set(first) - set(excluded))
    assert plan.excluded == gone and plan.reject_reasons["duplicate id"] == duplicates > 20
    assert sum(s.left_out for s in plan.shards) == gone + duplicates

    docs = pa.concat_tables([read_shard(s, source=source, metadata=plan.metadata,
                                        chosen=plan.chosen, skips=plan.skips)
                             for s in plan.shards])
    assert sorted(docs.column("doc_id").to_pylist()) == sorted(set(first) - set(excluded))
    # each kept document is the first record with its id
    kept = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist(),
                    strict=True))
    for doc_id, (path, line) in first.items():
        if doc_id not in excluded:
            f = int(Path(path).name.split("-")[1][0])
            assert kept[doc_id] == f"file {f} line {line - 1}"
    # every duplicate names its first record, as pass 3 reports it
    named = {(shard.path, shard.first_position + o - shard.start): where
             for shard, dups in with_duplicates(plan.dirty, plan.skips)
             for o, where in dups.items()}
    for path, line, doc_id in records:
        if first[doc_id] != (path, line) and doc_id not in excluded:
            assert named[(path, line)] == first[doc_id]
    rejects = plan.rejects.to_pylist()
    assert len(rejects) == duplicates
    for row in rejects:
        path, line = first[row["record_id"]]
        assert row["reason"].endswith(f"(first at line {line} of {path})")


def test_shards_read_the_same_from_files_and_refuse_another_plans(tmp_path) -> None:
    _corpus(tmp_path / "src")
    source = SourceSpec(uri=str(tmp_path / "src"), id_field="id", records_per_shard=7)
    plan = plan_source(source)
    assert plan.skips is not None
    uris = tuple(None if not p.num_rows else
                 write_part(p, str(tmp_path / "kept" / f"part-{i}.arrow"), {})
                 for i, p in enumerate(plan.skips.parts))
    from_files = Skips.from_json({"bounds": list(plan.skips.bounds), "parts": list(uris)}, {})
    dirty = [s for s in plan.shards if s.left_out]
    assert from_files.attach(dirty) == plan.skips.attach(dirty)
    # a task carries only the parts its shards need
    carried = from_files.only(dirty[:1])
    assert sum(p is not None for p in carried.parts) == 1
    assert carried.attach(dirty[:1]) == from_files.attach(dirty[:1])

    # a shard planned otherwise (another count) is refused, not read with wrong skips
    wrong = replace(dirty[-1], left_out=dirty[-1].left_out + 1)
    with pytest.raises(SourceChangedError, match="left out"):
        from_files.attach([wrong])


def test_a_finished_job_removes_only_stale_plannings(tmp_path) -> None:
    table = str(tmp_path / "docs.lance")
    root = tmp_path / "docs.plan.skips"
    part = pa.table({"unit": pa.array([0], pa.int32()), "ordinal": pa.array([1], pa.int64()),
                     "first_path": ["a"], "first_position": pa.array([1], pa.int64())})
    own = Skips((0,), (write_part(part, str(root / "mine" / "part-00000.arrow"), {}),))
    write_part(part, str(root / "young" / "part-00000.arrow"), {})
    old = write_part(part, str(root / "old" / "part-00000.arrow"), {})
    mine_old = own.parts[0]
    stamp = time.time() - STALE_SKIPS_S - 60
    for path in (old, mine_old):
        os.utime(path, (stamp, stamp))
    assert drop_skips(table, {}, own=own) == 1
    assert sorted(p.name for p in root.iterdir()) == ["mine", "young"]
