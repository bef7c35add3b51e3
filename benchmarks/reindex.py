"""Incremental reindex: time, exactness and reader consistency after a small corpus change.

Embeds a corpus (SciFact by default: 5,183 BEIR documents) into a fresh Lance table, then
edits 1% of the documents (a sentence taken from another document is appended), deletes
0.5% and adds 0.5% new ones (title and halves of the text recombined from other documents,
so they read like the rest), rewrites the source file and runs the same spec again, which
Quiver turns into an incremental reindex. It prints:

- the full job and the reindex (seconds, embed and index seconds) and the reindex's share
  of the full job (the goal is at most 5%);
- the chunks the reindex embedded against the number expected from Quiver's own chunker
  run here on the new corpus, and whether the final table holds exactly the new corpus's
  chunks (ids and content hashes, no loss, no duplicates);
- how many searches a reader thread ran on the latest version while the reindex ran, and
  how many saw a committed version with that version's exact row count.

The source is a copy of the corpus inside a temporary folder, since a reindex re-reads the
same `source.uri`; the folder is removed at the end unless `--keep` names one.

    python benchmarks/reindex.py                         # SciFact, about 10 min on 2 cores
    python benchmarks/reindex.py --limit 300             # a quick run on the first 300 docs
    python benchmarks/reindex.py --seed 7 --keep /tmp/ri # other edits; keep table and corpus
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import lance
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"
EDIT_SHARE = 0.01
DELETE_SHARE = 0.005
ADD_SHARE = 0.005
GOAL_SHARE = 0.05

Doc = dict[str, str]
Hashes = dict[str, bytes]


# ---------------------------------------------------------------- corpus and its change


def load_docs(path: Path, limit: int | None) -> list[Doc]:
    """The corpus records, in file order (the first `limit` when given)."""
    docs: list[Doc] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def write_docs(path: Path, docs: list[Doc]) -> None:
    """Write records as JSON lines; the job reads this file as its source."""
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def sentences(text: str) -> list[str]:
    """Split on sentence ends; good enough to recombine abstracts into plausible text."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def share(n: int, fraction: float) -> int:
    """At least one document, so a small `--limit` still exercises every kind of change."""
    return max(1, round(n * fraction))


@dataclass
class Change:
    """The corpus after the change, and which document ids were edited, deleted, added."""

    docs: list[Doc]
    edited: list[str]
    deleted: list[str]
    added: list[str]


def change_corpus(docs: list[Doc], seed: int) -> Change:
    """Edit, delete and add documents, deterministically for a seed.

    Edits append a real sentence from another document, so the last chunk of the edited
    document changes (and, when the text crosses a window boundary, its other windows
    too, which is what a reindex must handle). New documents get ids that do not exist
    yet and are placed at random positions, so they land in several shards.
    """
    rng = random.Random(seed)
    n = len(docs)
    n_edit, n_delete, n_add = share(n, EDIT_SHARE), share(n, DELETE_SHARE), share(n, ADD_SHARE)
    picked = rng.sample(range(n), n_edit + n_delete)
    edit_at, delete_at = set(picked[:n_edit]), set(picked[n_edit:])
    donors = [d for d in docs if len(sentences(d.get("text", ""))) >= 2]

    kept: list[Doc] = []
    for i, doc in enumerate(docs):
        if i in delete_at:
            continue
        if i in edit_at:
            extra = rng.choice(sentences(rng.choice(donors)["text"]))
            doc = {**doc, "text": f"{doc.get('text', '').rstrip()} {extra}"}
        kept.append(doc)

    numeric = all(d["_id"].isdigit() for d in docs)
    top = max((int(d["_id"]) for d in docs), default=0) if numeric else 0
    added: list[str] = []
    for k in range(n_add):
        first, second, third = rng.sample(donors, 3)
        a, b = sentences(first["text"]), sentences(second["text"])
        text = " ".join(a[: len(a) // 2] + b[len(b) // 2 :])
        new_id = str(top + 1 + k) if numeric else f"reindex-new-{seed}-{k}"
        kept.insert(rng.randrange(len(kept) + 1),
                    {"_id": new_id, "title": third.get("title", ""), "text": text})
        added.append(new_id)
    return Change(kept, edited=[docs[i]["_id"] for i in sorted(edit_at)],
                  deleted=[docs[i]["_id"] for i in sorted(delete_at)], added=added)


# ---------------------------------------------------------------- the job and its chunks


def table_spec(corpus: Path, table: Path) -> dict:
    """The job spec: the README's minimal SciFact spec, every default kept."""
    return {"kind": "embed",
            "source": {"uri": str(corpus), "id_field": "_id", "text_fields": ["title", "text"]},
            "table": str(table)}


def table_hashes(table: Path) -> tuple[Hashes, int]:
    """The table's id -> content_hash, and its row count (duplicate ids would differ)."""
    rows = lance.dataset(str(table)).to_table(columns=["id", "content_hash"])
    ids = rows.column("id").to_pylist()
    return dict(zip(ids, rows.column("content_hash").to_pylist(), strict=True)), len(ids)


def chunk_source(spec_dict: dict, table: Path) -> Hashes:
    """Chunk the current source file exactly as the job does, independently of its diff.

    The Chunker is built from the same pieces as `chunker_kwargs` in jobs/_embed_job.py:
    the table's manifest (chunk size, and the embedding fingerprint folded into every
    content hash), the model's document prefix and the source plan's metadata schema.
    """
    from operators.chunk import Chunker
    from operators.model import describe_model
    from operators.sources.plan import plan_source
    from operators.sources.read import read_shard
    from schemas.manifest import TableManifest
    from schemas.spec import parse_spec

    spec = parse_spec(spec_dict, origin="benchmark:reindex")
    manifest = TableManifest.from_schema(lance.dataset(str(table)).schema)
    info = describe_model(spec.model)
    plan = plan_source(spec.source)
    chunker = Chunker(
        info.path, max_tokens=manifest.chunking.max_tokens, overlap=spec.chunking.overlap,
        mode=spec.chunking.mode, document_prefix=info.document_prefix,
        metadata=plan.metadata, config_fingerprint=manifest.embedding_fingerprint(),
        trust_remote_code=spec.model.trust_remote_code,
    )
    hashes: Hashes = {}
    for shard in plan.shards:
        chunks = chunker(read_shard(shard, source=spec.source, metadata=plan.metadata,
                                    chosen=plan.chosen, skips=plan.skips))
        for cid, digest in zip(chunks.column("id").to_pylist(),
                               chunks.column("content_hash").to_pylist(), strict=True):
            if cid in hashes:
                raise ValueError(f"the chunker produced {cid} twice")
            hashes[cid] = digest
    return hashes


def run_job(spec_dict: dict) -> dict:
    """Run the spec through the public API and return its summary as a dict."""
    from jobs import api
    from schemas.spec import parse_spec

    return api.run(parse_spec(spec_dict, origin="benchmark:reindex")).to_dict()


# ---------------------------------------------------------------- readers during the reindex


@dataclass
class Readers:
    """A thread searching the latest version in a loop, recording what each search saw.

    `pause` seconds between searches keep the reader from taking a whole core of a small
    machine away from the reindex it is watching, which would distort the reindex time.
    """

    table: str
    query: np.ndarray
    pause: float
    seen: list[tuple[int, int, int]] = field(default_factory=list)
    """(version, count_rows, hits) per search, both read from one pinned dataset."""
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ds = lance.dataset(self.table)
                count = ds.count_rows()
                hits = ds.to_table(nearest={"column": "vector", "q": self.query, "k": 10,
                                            "metric": "dot"}, columns=["id", "_distance"])
                self.seen.append((ds.version, count, hits.num_rows))
            except Exception as exc:  # a failed read is a result to report
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.pause)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reindex-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def check(self, *, whole: set[int]) -> tuple[int, dict[int, int], int]:
        """Searches that saw a committed version with exactly that version's row count
        (and a full top 10); the versions seen, with their row counts; and how many
        searches saw a version the job has since removed (its checkpoint and index
        versions after the reindex commit). Those cannot be opened again, so they count
        as consistent only if their row count is one a whole table has (`whole`: the
        old table's or the new one's) and they got a full top 10."""
        committed = {int(v["version"]) for v in lance.dataset(self.table).versions()}
        counts: dict[int, int] = {}
        for version in {v for v, _, _ in self.seen} & committed:
            counts[version] = lance.dataset(self.table, version=version).count_rows()
        good = sum(1 for v, n, hits in self.seen
                   if (counts.get(v) == n if v in committed else n in whole)
                   and hits == min(10, n))
        removed = sum(1 for v, _, _ in self.seen if v not in committed)
        return good, counts, removed


# ---------------------------------------------------------------- main


def compare(name: str, got: object, expected: object) -> str:
    """One result line ending in OK or MISMATCH."""
    verdict = "OK" if got == expected else "MISMATCH"
    return f"{name}: {got}, expected {expected}  {verdict}"


def benchmark(work: Path, args: argparse.Namespace) -> list[str]:
    """Full job, change, reindex with readers, checks; returns the report lines."""
    corpus, table = work / "corpus.jsonl", work / "bench.lance"
    if table.exists():
        raise SystemExit(f"{table} already exists; --keep needs a folder without it")
    docs = load_docs(args.corpus, args.limit)
    write_docs(corpus, docs)
    spec = table_spec(corpus, table)

    full = run_job(spec)
    old, old_rows = table_hashes(table)
    old_chunked = chunk_source(spec, table)  # proves the chunker here matches the job's

    change = change_corpus(docs, args.seed)
    write_docs(corpus, change.docs)
    new = chunk_source(spec, table)
    expected = {
        "added": sum(1 for c in new if c not in old),
        "changed": sum(1 for c, h in new.items() if c in old and old[c] != h),
        "deleted": sum(1 for c in old if c not in new),
        "unchanged": sum(1 for c, h in new.items() if old.get(c) == h),
    }
    expected["embedded"] = expected["added"] + expected["changed"]

    query = np.asarray(lance.dataset(str(table)).to_table(columns=["vector"], limit=1)
                       .column("vector")[0].as_py(), dtype=np.float32)
    readers = Readers(str(table), query, args.reader_pause)
    readers.start()
    try:
        re_run = run_job(spec)
    finally:
        readers.stop()
    final, final_rows = table_hashes(table)
    good, counts, removed = readers.check(whole={full["chunks"], final_rows})
    diff = re_run["reindex"] or {}

    share_of_full = re_run["seconds"] / full["seconds"] if full["seconds"] else float("nan")
    return [
        f"corpus: {args.corpus} ({len(docs)} docs, seed {args.seed}): {len(change.edited)} "
        f"edited, {len(change.deleted)} deleted, {len(change.added)} added "
        f"-> {len(change.docs)} docs",
        f"full job: {full['chunks']} chunks, {full['tokens']} tokens, {full['seconds']} s "
        f"(embed {full['embed_seconds']} s, index {full['index_seconds']} s)",
        f"reindex:  {re_run['chunks']} chunks, {re_run['tokens']} tokens, "
        f"{re_run['seconds']} s (embed {re_run['embed_seconds']} s, index "
        f"{re_run['index_seconds']} s); index: {re_run['index']}",
        f"reindex parts: ray start {(re_run.get('profile') or {}).get('ray_start')} s, plan "
        f"{(re_run.get('profile') or {}).get('plan')} s, "
        + ", ".join(f"{k} {v} s" for k, v in (diff.get("seconds") or {}).items()),
        f"reindex / full job: {share_of_full:.1%} (goal <= {GOAL_SHARE:.0%})  "
        + ("OK" if share_of_full <= GOAL_SHARE else "ABOVE GOAL"),
        compare("chunker reproduces the full job's table (chunks)",
                sum(1 for c, h in old_chunked.items() if old.get(c) == h), old_rows),
        compare("reindex diff (added, changed, deleted, unchanged)",
                tuple(diff.get(k) for k in ("added", "changed", "deleted", "unchanged")),
                tuple(expected[k] for k in ("added", "changed", "deleted", "unchanged"))),
        compare("chunks embedded by the reindex", diff.get("embedded"), expected["embedded"]),
        compare("final table rows / distinct ids", (final_rows, len(final)),
                (len(new), len(new))),
        compare("final ids and hashes equal the new corpus's chunks",
                "equal" if final == new else
                f"{len(new.keys() - final.keys())} missing, {len(final.keys() - new.keys())} "
                f"extra, {sum(1 for c in new.keys() & final.keys() if new[c] != final[c])} "
                "stale", "equal"),
        f"readers: {len(readers.seen)} searches during the reindex, versions seen "
        + ", ".join(f"v{v}={n} rows" for v, n in sorted(counts.items()))
        + f"; {removed} on versions the job removed at its end",
        compare("readers consistent (committed version, its count_rows, top 10)",
                good, len(readers.seen))
        + (f"; {len(readers.errors)} errors, first: {readers.errors[0]}"
           if readers.errors else ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=SCIFACT,
                        help="BEIR corpus.jsonl (_id, title, text).")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it.")
    parser.add_argument("--seed", type=int, default=0, help="Chooses the changed documents.")
    parser.add_argument("--limit", type=int, help="Use only the first N documents.")
    parser.add_argument("--reader-pause", type=float, default=0.05,
                        help="Seconds between the reader thread's searches.")
    args = parser.parse_args()
    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores", flush=True)

    started = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="quiver-reindex-"))
    try:
        lines = benchmark(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n== reindex benchmark")
    print("\n".join(lines))
    print(f"wall time: {time.perf_counter() - started:.1f} s"
          + (f"; kept in {work}" if args.keep else ""))


if __name__ == "__main__":
    main()
