"""Model cut-over: readers follow the `current` tag, which moves only to complete versions.

Every job ends by pointing the table's `current` tag at its final, indexed version, and
`open_table` reads that tag by default. A job that changes the embedding configuration
(model, pooling, chunking, codecs) first pins `current` where it is, writes the new
configuration as new versions of the same dataset (a Lance Overwrite, so no version ever
mixes two models), builds the indices, and only then moves the tag: readers switch from
the old model to the new one in one step. The old versions stay readable by number until
`write.retention_days` removes them.
"""

from __future__ import annotations

import lance

from jobs._tags import CURRENT_TAG, current_version, held_version
from jobs.table import open_table
from operators.lease import Lease
from schemas.manifest import TableManifest

COMPARE_QUERIES = 200


def pin_current(ds: lance.LanceDataset) -> int:
    """Make sure `current` exists (on the latest version if it did not); return its version."""
    version = current_version(ds)
    if version is None:
        ds.tags.create(CURRENT_TAG, ds.version)
        version = ds.version
    return version


def cut_over(ds: lance.LanceDataset, manifest: TableManifest, *,
             compare: str | None = None, lease: Lease | None = None) -> dict | None:
    """Move `current` to `ds.version`; when that changes the embedding configuration,
    return a report (versions, and the top-10 overlap on `compare`'s queries).

    A held table (`HELD_TAG`, after a rollback) keeps `current` where it is: the report
    then says so, and readers stay on the version the user chose. A tag is no Lance
    transaction, so no fence reaches it: `lease` is checked just before the tag is
    written, and a run that was taken over leaves `current` alone (`LeaseLostError`).
    """
    previous = current_version(ds)
    held = held_version(ds)
    if held is not None and previous is not None:
        return {"held": True, "current": previous, "latest": ds.version,
                "hint": f"'{CURRENT_TAG}' is held at version {previous} (quiver table "
                        f"restore); readers stay there until `quiver table promote`"}
    report = None
    if previous is not None and previous != ds.version:
        old = TableManifest.from_schema(ds.checkout_version(previous).schema)
        if old.embedding_settings() != manifest.embedding_settings():
            report = {"from_version": previous, "to_version": ds.version,
                      "from_model": old.model.name, "to_model": manifest.model.name}
            if compare:
                report.update(model_change_report(ds.uri, previous, ds.version, compare))
    if lease is not None and previous != ds.version:
        lease.check()
    if previous is None:
        ds.tags.create(CURRENT_TAG, ds.version)
    elif previous != ds.version:
        ds.tags.update(CURRENT_TAG, ds.version)
    return report


def model_change_report(uri: str, old_version: int, new_version: int, beir: str) -> dict:
    """Top-10 document overlap between the old and the new version on a BEIR folder's
    queries (at most `COMPARE_QUERIES`), each embedded with its own version's model."""
    import numpy as np

    from operators.evaluate import load_beir

    texts = load_beir(beir).texts[:COMPARE_QUERIES]
    tops = []
    for version in (old_version, new_version):
        table = open_table(uri, version=version)
        ranked = table.search_documents(table.embed_queries(texts), k=10)
        tops.append([{d for d, _ in docs} for docs in ranked])
    overlap = [len(a & b) / 10 for a, b in zip(*tops, strict=True)]
    return {"queries": len(texts), "top10_overlap": round(float(np.mean(overlap)), 4),
            "top10_overlap_min": round(float(np.min(overlap)), 4)}
