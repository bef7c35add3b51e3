"""Many-file sources: folders and globs of one format, compressed files, files left out
counted by suffix, duplicates across files, CSV shards read from byte offsets, and a file
changed after planning refused by name. Planning here runs in-process (no Ray)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.sources.plan import plan_source
from operators.sources.read import read_groups, read_shard, read_shards
from schemas.errors import SourceChangedError, SourceError
from schemas.spec import SourceSpec


def _docs(plan, source: SourceSpec) -> pa.Table:
    return pa.concat_tables([read_shard(s, source=source, metadata=plan.metadata,
                                        chosen=plan.chosen, skips=plan.skips)
                             for s in plan.shards])


def _write(path: Path, rows: list[dict], *, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture()
def shards_folder(tmp_path: Path) -> Path:
    """A folder the way datasets ship: compressed JSON Lines parts, plus files that are
    not data (a README, a checksum, a hidden file, a _SUCCESS marker)."""
    import pyarrow as pa  # noqa: F401  (zstd through pyarrow's codecs)

    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    _write(root / "part-0.jsonl.gz", [{"id": f"a{i}", "text": f"alpha {i}", "n": i}
                                      for i in range(7)], opener=gzip.open)
    _write(root / "part-1.jsonl", [{"id": f"b{i}", "text": f"beta {i}", "n": i}
                                   for i in range(5)] + [{"id": "a3", "text": "again"}])
    with pa.CompressedOutputStream(str(root / "sub" / "part-2.jsonl.zst"), "zstd") as out:
        out.write(b"".join(json.dumps({"id": f"c{i}", "text": f"gamma {i}", "n": i})
                           .encode() + b"\n" for i in range(4)))
    (root / "README.md").write_text("# not data")
    (root / "part-0.jsonl.gz.sha256").write_text("abc")
    (root / ".hidden.jsonl").write_text('{"id": "h", "text": "hidden"}\n')
    (root / "_SUCCESS").write_text("")
    return root


def test_a_folder_of_compressed_parts_is_read_whole(shards_folder: Path) -> None:
    source = SourceSpec(uri=str(shards_folder), id_field="id", records_per_shard=3)
    plan = plan_source(source)
    assert plan.kind == "jsonl" and plan.files == 3
    assert plan.skipped == {".md": 1, ".sha256": 1, ".jsonl": 1, "(none)": 1}
    assert plan.records == 17 and plan.rejected == 1  # the second a3
    assert max(s.records for s in plan.shards) == 3  # records_per_shard, in every file
    assert all(s.offset is not None for s in plan.shards)  # compressed ones too
    docs = _docs(plan, source)
    assert sorted(docs.column("doc_id").to_pylist()) == sorted(
        [f"a{i}" for i in range(7)] + [f"b{i}" for i in range(5)] + [f"c{i}" for i in range(4)])
    # The first a3 in (file, line) order wins; the later one names it.
    assert docs.filter(pa.compute.equal(docs.column("doc_id"), "a3")) \
        .column("text").to_pylist() == ["alpha 3"]
    reject = plan.rejects.to_pylist()[0]
    assert reject["position"] == 6 and reject["source"].endswith("part-1.jsonl")
    assert "first at line 4 of" in reject["reason"] and "part-0.jsonl.gz" in reject["reason"]


def test_shards_of_a_compressed_file_share_one_read_pass(shards_folder: Path) -> None:
    """All the consecutive shards of a compressed file are read in one task, in one pass,
    and give exactly what reading each shard alone gives; a plain file's shards share a
    task too, but are split to fill the read slots (they seek), a compressed file's never."""
    source = SourceSpec(uri=str(shards_folder), id_field="id", records_per_shard=2)
    plan = plan_source(source)
    groups = read_groups(plan.shards, tasks=1)
    assert [(g[0].path.rsplit("/", 1)[-1], len(g)) for g in groups] == [
        ("part-0.jsonl.gz", 4), ("part-1.jsonl", 3), ("part-2.jsonl.zst", 2)]
    kw = dict(source=source, metadata=plan.metadata, chosen=plan.chosen, skips=plan.skips)
    for group in groups:
        together = list(read_shards(group, **kw))
        assert [shard for shard, _ in together] == list(group)
        for shard, docs in together:
            assert docs.equals(read_shard(shard, **kw))
    filled = read_groups(plan.shards, tasks=8)
    assert [(g[0].path.rsplit("/", 1)[-1], len(g)) for g in filled] == [
        ("part-0.jsonl.gz", 4), ("part-1.jsonl", 1), ("part-1.jsonl", 1),
        ("part-1.jsonl", 1), ("part-2.jsonl.zst", 2)]
    with pytest.raises(ValueError, match="does not follow"):
        list(read_shards([plan.shards[1], plan.shards[0]], **kw))


def test_a_glob_picks_its_files(shards_folder: Path) -> None:
    source = SourceSpec(uri=str(shards_folder / "*.jsonl*"), id_field="id")
    plan = plan_source(source)
    assert plan.files == 3  # fnmatch's * crosses folders: sub/part-2.jsonl.zst too
    only_gz = plan_source(SourceSpec(uri=str(shards_folder / "*.gz"), id_field="id"))
    assert only_gz.files == 1 and only_gz.documents == 7


def test_parquet_folder_shards_follow_records_per_shard(tmp_path: Path) -> None:
    root = tmp_path / "pq"
    root.mkdir()
    for f in range(3):
        table = pa.table({"doc": [f"{f}-{i}" for i in range(10)],
                          "body": [f"text {f} {i}" for i in range(10)],
                          "year": pa.array(range(10), pa.int16())})
        pq.write_table(table, root / f"part-{f}.parquet", row_group_size=6)
    source = SourceSpec(uri=str(root), id_field="doc", text_fields=["body"],
                        records_per_shard=4)
    plan = plan_source(source)
    # row groups of 6 and 4 rows, cut at 4: 4 + 2 + 4 per file
    assert [s.records for s in plan.shards] == [4, 2, 4] * 3
    docs = _docs(plan, source)
    assert docs.num_rows == 30 and docs.schema.field("year").type == pa.int16()
    assert docs.column("doc_id").to_pylist()[:5] == ["0-0", "0-1", "0-2", "0-3", "0-4"]


def test_csv_shards_start_at_byte_offsets_even_past_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    rows = [f'{i},"line one of {i}\nline two of {i}",{2000 + i}' for i in range(7)]
    path.write_text("id,text,year\n" + "\n".join(rows) + "\n")
    source = SourceSpec(uri=str(path), id_field="id", records_per_shard=2)
    plan = plan_source(source)
    assert [s.records for s in plan.shards] == [2, 2, 2, 1]
    assert all(s.offset is not None for s in plan.shards)
    assert [s.first_position for s in plan.shards] == [2, 6, 10, 14]
    docs = _docs(plan, source)
    assert docs.column("doc_id").to_pylist() == [str(i) for i in range(7)]
    assert docs.column("text").to_pylist()[3] == "line one of 3\nline two of 3"
    assert docs.column("year").to_pylist() == list(range(2000, 2007))


def test_text_folder_reads_rst_and_compressed_text(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    root.mkdir()
    (root / "a.rst").write_text("Title\n=====\nrestructured")
    with gzip.open(root / "b.txt.gz", "wt") as f:
        f.write("compressed note")
    (root / "c.pdf").write_bytes(b"%PDF")
    source = SourceSpec(uri=str(root))
    plan = plan_source(source)
    assert plan.skipped == {".pdf": 1}
    docs = _docs(plan, source)
    assert dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist(),
                    strict=True)) == {"a.rst": "Title\n=====\nrestructured",
                                      "b.txt.gz": "compressed note"}


def test_a_folder_of_two_data_formats_needs_a_format(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    _write(root / "a.jsonl", [{"id": "1", "text": "x"}])
    (root / "b.csv").write_text("id,text\n2,y\n")
    with pytest.raises(SourceError, match=r"several formats \(1 csv, 1 jsonl\)"):
        plan_source(SourceSpec(uri=str(root), id_field="id"))
    plan = plan_source(SourceSpec(uri=str(root), id_field="id", format="csv"))
    assert plan.documents == 1 and plan.skipped == {".jsonl": 1}


def test_a_file_changed_after_planning_is_refused_by_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [{"id": str(i), "text": f"t {i}"} for i in range(4)])
    source = SourceSpec(uri=str(path), id_field="id")
    plan = plan_source(source)
    with path.open("a") as f:
        f.write(json.dumps({"id": "new", "text": "appended"}) + "\n")
    with pytest.raises(SourceChangedError, match=r"c\.jsonl: changed while the job ran"):
        read_shard(plan.shards[0], source=source, metadata=plan.metadata, chosen=plan.chosen)
    # Same size, new mtime: still refused.
    plan = plan_source(source)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(SourceChangedError, match="changed while the job ran"):
        read_shard(plan.shards[0], source=source, metadata=plan.metadata, chosen=plan.chosen)


def test_planning_and_reading_hash_each_document_alike(tmp_path: Path) -> None:
    """The plan's pass 1 hashes documents from raw records, and the reader hashes them
    again from the same records: the two must agree (a reindex compares the plan's hashes
    with those the table got at write time), even where the typed value differs from the
    raw one (an int widened to float, a nested value stored as JSON). Duplicates and
    ill-typed records never reach the diff."""
    from operators.sources.dedup import find_duplicates, source_documents
    from operators.sources.plan import bad_signatures, choose_kinds
    from operators.sources.scan import scan_unit, units_of

    rows = [{"id": "a", "text": "one", "score": 1, "tags": {"k": [1, 2]}, "year": 2020},
            {"id": "b", "text": "two", "score": 2.5, "tags": None, "year": 2021},
            {"id": "c", "text": "three", "year": 2022},
            {"id": "a", "text": "dup of a", "score": 3},
            {"id": "e", "text": "ill-typed", "year": "soon"},
            {"id": "d", "text": "four", "score": 4, "tags": {"k": []}, "extra": "x"}]
    source = SourceSpec(uri=str(_write(tmp_path / "c.jsonl", rows)), id_field="id",
                        records_per_shard=2)
    plan = plan_source(source)
    assert plan.chosen["score"] == "float" and plan.chosen["tags"] == "json"
    read = _docs(plan, source)
    _, units = units_of(source)
    scanned = [scan_unit(u, source, buckets=2, documents=True) for u in units]
    chosen, _ = choose_kinds([scan for scan, _ in scanned], typed=False)
    bad = frozenset(bad_signatures([scan for scan, _ in scanned], chosen))
    assert bad  # the record whose year is a string
    tables = [t for _, bucket in scanned for t in bucket]
    planned = source_documents(tables, bad=bad, losers=find_duplicates(tables, bad=bad))
    assert sorted(planned.column("doc_id").to_pylist()) == ["a", "b", "c", "d"]
    by_id = dict(zip(planned.column("doc_id").to_pylist(),
                     planned.column("doc_hash").to_pylist(), strict=True))
    assert by_id == dict(zip(read.column("doc_id").to_pylist(),
                             read.column("doc_hash").to_pylist(), strict=True))
    assert len(set(by_id.values())) == 4


def test_rejects_of_a_compressed_file_come_from_one_pass(tmp_path: Path) -> None:
    """Pass 3 reads a compressed file once for all its dirty shards (clean shards between
    them skipped), and finds exactly the rows that reading each dirty shard alone finds."""
    from operators.sources.rejects import (
        reject_groups,
        rejects_of,
        shard_rejects,
        with_duplicates,
    )

    lines = []
    for i in range(40):
        if i in (3, 17, 18, 35):
            lines.append("{not json" if i != 17 else json.dumps({"id": "d1", "text": ""}))
        else:
            lines.append(json.dumps({"id": "dup" if i in (5, 30) else f"d{i}",
                                     "text": f"doc {i}"}))
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    source = SourceSpec(uri=str(path), id_field="id", records_per_shard=4)
    plan = plan_source(source)
    groups = reject_groups(plan.dirty)
    assert len(groups) == 1 and len(groups[0]) == len(plan.dirty) == 4  # shards 0,4,7,8
    together = rejects_of(groups[0], source, chosen=plan.chosen, skips=plan.skips)
    alone = pa.concat_tables([shard_rejects(s, source, chosen=plan.chosen, duplicates=d)
                              for s, d in with_duplicates(plan.dirty, plan.skips)])
    assert together.equals(alone)
    assert together.column("position").to_pylist() == [4, 18, 19, 31, 36]
    assert together.equals(plan.rejects)


def test_a_big_plain_file_is_planned_in_byte_ranges_with_exact_lines(tmp_path: Path) -> None:
    """A plain JSON Lines file bigger than `unit_bytes` is validated as several byte
    ranges, and the plan is the one a single pass makes: the same documents in the same
    order, the same rejects at the same line numbers, a duplicate named with the line of
    its first occurrence in an earlier range."""
    lines = []
    for i in range(400):
        if i % 37 == 5:
            lines.append("")  # blank lines count as lines, not records
        if i % 53 == 7:
            lines.append("{not json")
        lines.append(json.dumps({"id": f"d{i}", "text": f"document {i} " + "x" * (i % 90),
                                 "year": 1900 + i}))
    lines.append(json.dumps({"id": "d3", "text": "a late duplicate of d3"}))
    lines.append(json.dumps({"id": "d250", "text": "and of d250"}))
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    whole = SourceSpec(uri=str(path), id_field="id", records_per_shard=30)
    ranged = whole.model_copy(update={"unit_bytes": 1024})
    one, many = plan_source(whole), plan_source(ranged)

    units = {s.unit for s in many.shards}
    assert len({s.unit for s in one.shards}) == 1 and len(units) >= path.stat().st_size // 1024
    assert (many.documents, many.rejected, many.reject_reasons) == \
        (one.documents, one.rejected, one.reject_reasons)
    rows = ["source", "position", "reason", "raw"]
    assert many.rejects.select(rows).to_pylist() == one.rejects.select(rows).to_pylist()
    reasons = many.rejects.column("reason").to_pylist()
    first_d3 = next(n for n, line in enumerate(lines, 1) if '"id": "d3"' in line)
    assert any(f"line {first_d3} " in r for r in reasons if "duplicate" in r)
    assert _docs(many, ranged).to_pylist() == _docs(one, whole).to_pylist()
    with path.open(encoding="utf-8") as f:  # positions are the file's own line numbers
        numbered = dict(enumerate(f, 1))
    for shard in many.shards:
        assert json.loads(numbered[shard.first_position])  # a record starts there
