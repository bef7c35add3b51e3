"""The shard labels a checkpoint commit carries, written as runs so their size does not
grow with the shard count.

A commit names the shards it adds (`operators.write.commit`), and a resume reads those
names back from every commit of the job. Shard ids are `<unit digest>:<first record>`
(`operators.sources.plan.shard_id_for`), and a commit's shards are mostly consecutive
shards of a few units, whose first records step by the same count. So the label groups
ids by unit and writes each unit's starts as arithmetic runs `[first, step, count]`:
thousands of shards of one file take a few bytes instead of ~22 bytes each, and the
manifest (which holds the transaction inline) stops growing with shards per commit. Ids
of another shape are kept as they are.

    >>> label = encode(["ab:0", "ab:10", "ab:20", "ab:35", "cd:5", "other"])
    >>> label
    '{"ids":["other"],"runs":{"ab":[[0,10,3],[35,0,1]],"cd":[[5,0,1]]}}'
    >>> sorted(decode(label))
    ['ab:0', 'ab:10', 'ab:20', 'ab:35', 'cd:5', 'other']
    >>> decode('["s1", "s2"]')  # the older label: a plain list
    ['s1', 's2']
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

_ID = re.compile(r"^(?P<unit>[^:]+):(?P<start>0|[1-9][0-9]*)$")


def encode(shard_ids: Iterable[str]) -> str:
    """One commit's shard ids as a compact JSON label (see the module doc)."""
    starts: dict[str, list[int]] = {}
    others: list[str] = []
    for shard_id in shard_ids:
        m = _ID.match(shard_id)
        if m:
            starts.setdefault(m["unit"], []).append(int(m["start"]))
        else:
            others.append(shard_id)
    runs = {unit: _runs(sorted(set(values))) for unit, values in sorted(starts.items())}
    return json.dumps({"ids": sorted(set(others)), "runs": runs}, separators=(",", ":"))


def decode(label: str) -> list[str]:
    """The shard ids a label names; also reads the older plain-list labels."""
    value = json.loads(label)
    if isinstance(value, list):
        return [str(x) for x in value]
    ids = [str(x) for x in value.get("ids", [])]
    for unit, runs in value.get("runs", {}).items():
        for first, step, count in runs:
            ids.extend(f"{unit}:{first + step * n}" for n in range(count))
    return ids


def _runs(values: list[int]) -> list[list[int]]:
    """Sorted distinct starts as greedy arithmetic runs `[first, step, count]`; a lone
    value is `[value, 0, 1]`.

    >>> _runs([0, 5, 10, 11, 12, 20])
    [[0, 5, 3], [11, 1, 2], [20, 0, 1]]
    """
    runs: list[list[int]] = []
    i = 0
    while i < len(values):
        if i + 1 == len(values):
            runs.append([values[i], 0, 1])
            break
        step = values[i + 1] - values[i]
        j = i + 1
        while j + 1 < len(values) and values[j + 1] - values[j] == step:
            j += 1
        runs.append([values[i], step, j - i + 1])
        i = j + 1
    return runs
