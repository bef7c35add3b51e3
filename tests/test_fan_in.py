"""Pass 1's per-record results fan in with bounded arity: the driver never holds one ref
per unit and bucket for the whole source, a dedup task never takes one argument per
unit, and the plan is the same whatever the fan-in."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import write_jsonl

import jobs._plan as plan_module
from jobs._plan import FanIn, plan_on_cluster
from operators.sources.rejects import with_duplicates
from schemas.spec import SourceSpec


def _unit(n: int, buckets: int):
    """A fake scan: a summary, then bucket b's rows (unit n, row b)."""
    return (f"summary {n}", *[pa.table({"unit": [n], "bucket": [b]}) for b in range(buckets)])


@pytest.mark.parametrize("buckets", [1, 3])
def test_fan_in_merges_in_groups_and_keeps_every_row(ray_local, monkeypatch, buckets) -> None:
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests
    monkeypatch.setattr(plan_module, "FAN_IN", 3)
    units = list(range(40))
    scan = ray.remote(_unit).options(num_returns=buckets + 1)
    fan_in = FanIn(buckets, task_cpus=0.5)
    held = []
    submit = fan_in._add

    def counting(refs):  # how many bucket refs the driver holds after each unit
        submit(refs)
        held.append(sum(len(r) for r in fan_in.waiting + fan_in.merged))

    fan_in._add = counting
    summaries = fan_in.scan_all(units, lambda u: scan.remote(u, buckets), window=4)
    assert summaries == [f"summary {n}" for n in units]  # in unit order
    parts = fan_in.per_bucket()
    # 40 units through groups of 3: 13 merges of units, and the merged lists merged again
    # whenever more than 3 wait, so a bucket's dedup takes under 2 x 3 tables (at most 3
    # merged, fewer than 3 unmerged)...
    assert fan_in.merges > 40 // 3 and all(len(p) < 2 * 3 for p in parts)
    # ...and the driver never held more than that many lists of bucket refs.
    assert max(held) < 2 * 3 * buckets
    for b, refs in enumerate(parts):
        rows = pa.concat_tables(ray.get(refs))
        assert sorted(rows.column("unit").to_pylist()) == units
        assert set(rows.column("bucket").to_pylist()) == {b}


def test_the_plan_is_the_same_whatever_the_fan_in(ray_local, monkeypatch, tmp_path) -> None:
    """12 files whose ids repeat across files: the first in (file, position) order wins,
    with fan-in 2 (merges of merges) exactly as with the default, and with the left-out
    records kept in files (a job's way) exactly as in the object store."""
    for f in range(12):
        write_jsonl(tmp_path / f"part-{f:02d}.jsonl",
                    [{"id": f"d{(f * 7 + i) % 50}", "text": f"file {f} line {i}"}
                     for i in range(9)])
    source = SourceSpec(uri=str(tmp_path), id_field="id", records_per_shard=4)

    def planned(keep=None):
        plan, documents = plan_on_cluster(source, task_cpus=0.5, cpus=2, documents=True,
                                          keep=keep)
        import ray

        docs = pa.concat_tables(ray.get(documents.refs)).sort_by("doc_id")
        # the driver's shards count their duplicates; the records are fetched from skips
        assert not any(s.skip for s in plan.shards)
        assert sum(s.left_out for s in plan.shards) == plan.reject_reasons["duplicate id"]
        first = {d: (shard.shard_id, n) for shard, dups in
                 with_duplicates(plan.dirty, plan.skips) for n, d in dups.items()}
        return (plan.documents, plan.rejected, dict(plan.reject_reasons),
                [s.shard_id for s in plan.shards], first, docs.to_pylist())

    default = planned()
    kept = tmp_path.parent / f"{tmp_path.name}-kept"
    assert planned(str(kept)) == default
    # one file per part that has any (a part per file here, the first file has none);
    # each bucket's share of a part was removed once gathered
    assert sorted(p.name for p in kept.iterdir()) == [f"part-{u:05d}.arrow"
                                                      for u in range(1, 12)]
    monkeypatch.setattr(plan_module, "FAN_IN", 2)
    assert planned() == default
    assert default[0] == 50 and default[1] == 12 * 9 - 50
