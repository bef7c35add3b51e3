"""The tags readers follow: `current` names the last complete, indexed version, and
`current-held` marks a rollback that jobs must not move (see `jobs._cutover`). Kept
apart so that opening a table for search needs nothing from the job side."""

from __future__ import annotations

import lance

CURRENT_TAG = "current"
HELD_TAG = "current-held"
"""Set by `quiver table restore`: `current` was moved by hand (a rollback), and jobs
leave it where it is until `quiver table promote` moves it and drops this tag."""


def current_version(ds: lance.LanceDataset) -> int | None:
    """The version the `current` tag names, or None for a table without it."""
    tag = ds.tags.list().get(CURRENT_TAG)
    return None if tag is None else int(tag["version"])


def held_version(ds: lance.LanceDataset) -> int | None:
    """The version a rollback holds `current` at, or None when jobs may move it."""
    tag = ds.tags.list().get(HELD_TAG)
    return None if tag is None else int(tag["version"])
