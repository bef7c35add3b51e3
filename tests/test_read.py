"""Reading and validating sources: every bad-record kind lands in the rejects, with its
file, position and reason, and readers return exactly the other records."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from operators.sources.plan import plan_source
from operators.sources.read import read_shard
from schemas.errors import SourceError
from schemas.spec import SourceSpec


def _read_all(plan, source: SourceSpec) -> pa.Table:
    return pa.concat_tables(
        [read_shard(s, source=source, metadata=plan.metadata, chosen=plan.chosen,
                    skips=plan.skips)
         for s in plan.shards]
    )


def _rejects_by_line(plan) -> dict[int, str]:
    return {r["position"]: r["reason"] for r in plan.rejects.to_pylist()}


@pytest.fixture()
def messy_jsonl(tmp_path: Path, stdlib_docs: list[dict]) -> Path:
    good = [{"_id": d["id"], "title": d["title"], "text": d["text"], "n": d["definitions"]}
            for d in stdlib_docs[:6]]
    lines: list[object] = [
        good[0],                                             # 1 ok
        '{"_id": "broken", "text": "no closing brace"',      # 2 invalid JSON
        '["a", "list"]',                                     # 3 not an object
        {"title": "t", "text": "no id here"},                # 4 missing id
        {"_id": "no-text", "title": None},                   # 5 missing text fields? title only
        {"_id": "null-text", "title": None, "text": None},   # 6 null text
        {"_id": "empty-text", "title": "  ", "text": ""},    # 7 empty text
        {"_id": ["x"], "text": "id is a list"},              # 8 wrong id type
        {"_id": "int-text", "text": 42},                     # 9 wrong text type
        good[1],                                             # 10 ok
        {**good[2], "_id": good[0]["_id"]},                  # 11 duplicate of line 1
        {**good[3], "n": "three"},                           # 12 wrong metadata type
        "",                                                  # 13 blank line: not a record
        good[4],                                             # 14 ok
        {"_id": 7, "text": "integer ids become strings", "n": 1},  # 15 ok
    ]
    path = write_jsonl(tmp_path / "messy.jsonl", lines)
    with path.open("ab") as f:  # 16 non-UTF-8 bytes
        f.write(b'{"_id": "latin1", "text": "caf\xe9"}\n')
        f.write((json.dumps(good[5]) + "\n").encode())  # 17 ok
    return path


def test_every_bad_record_kind_is_rejected_with_line_and_reason(messy_jsonl: Path) -> None:
    source = SourceSpec(uri=str(messy_jsonl), id_field="_id", text_fields=["title", "text"],
                        records_per_shard=4)
    plan = plan_source(source)
    reasons = _rejects_by_line(plan)
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "not a JSON object (got list)"
    assert reasons[4] == "missing id field '_id'"
    assert reasons[5] == "null text"
    assert reasons[6] == "null text"
    assert reasons[7] == "empty text"
    assert reasons[8].startswith("wrong type for id field '_id'")
    assert reasons[9] == "wrong type for text field 'text': expected string, got int"
    assert reasons[11].startswith("duplicate id") and "line 1 " in reasons[11]
    assert reasons[12] == "wrong type for field 'n': expected int64, got str"
    assert reasons[16].startswith("not valid UTF-8")
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 16}
    assert all(r["source"] == str(messy_jsonl) for r in plan.rejects.to_pylist())
    assert all(r["position_kind"] == "line" for r in plan.rejects.to_pylist())
    # Nothing is lost: every non-blank line is either a document or a reject.
    assert plan.records == 16
    assert plan.documents + plan.rejects.num_rows == plan.records

    docs = _read_all(plan, source)
    assert docs.num_rows == plan.documents == 5
    assert sorted(docs.column("doc_id").to_pylist()) == sorted(
        [json.loads(line)["_id"] if isinstance(json.loads(line)["_id"], str) else "7"
         for i, line in enumerate(messy_jsonl.read_text("utf-8", "replace").splitlines(), 1)
         if i in (1, 10, 14, 15, 17)]
    )
    assert docs.schema.field("n").type == pa.int64()


def test_missing_text_field_reason(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "body": "words"},
                                              {"_id": "b", "text": "fine"}])
    plan = plan_source(SourceSpec(uri=str(path), id_field="_id"))
    assert _rejects_by_line(plan) == {1: "missing text field ['text']"}


def test_duplicates_across_shards_keep_the_first(tmp_path: Path) -> None:
    rows = [{"_id": f"d{i % 5}", "text": f"document number {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    source = SourceSpec(uri=str(path), id_field="_id", records_per_shard=3)
    plan = plan_source(source)
    assert len(plan.shards) == 4
    assert plan.rejects.num_rows == 5
    docs = _read_all(plan, source)
    assert sorted(docs.column("text").to_pylist()) == [f"document number {i}" for i in range(5)]


def test_metadata_types_come_from_the_whole_source(tmp_path: Path) -> None:
    rows = [{"_id": str(i), "text": "t", "year": 2000 + i, "score": i, "tags": ["a"]}
            for i in range(5)]
    rows[3]["score"] = 0.5  # ints and floats widen to float64, no reject
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    source = SourceSpec(uri=str(path), id_field="_id", records_per_shard=2)
    plan = plan_source(source)
    assert plan.rejects.num_rows == 0
    assert plan.metadata.field("year").type == pa.int64()
    assert plan.metadata.field("score").type == pa.float64()
    assert plan.metadata.field("tags").type == pa.string()  # lists kept as JSON text
    docs = _read_all(plan, source)
    assert docs.column("score").to_pylist() == [0.0, 1.0, 2.0, 0.5, 4.0]
    assert docs.column("tags").to_pylist()[0] == '["a"]'


def test_reserved_column_names_are_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"_id": "a", "text": "t", "vector": 1}])
    with pytest.raises(SourceError, match="'vector' clashes"):
        plan_source(SourceSpec(uri=str(path), id_field="_id"))


def test_csv_with_a_ragged_row(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('id,text,year\n1,"first, with a comma",2001\n2,ragged\n3,third,2003\n')
    source = SourceSpec(uri=str(path), id_field="id")
    plan = plan_source(source)
    assert _rejects_by_line(plan) == {3: "ragged row: 2 fields, the header has 3"}
    docs = _read_all(plan, source)
    assert docs.column("text").to_pylist() == ["first, with a comma", "third"]
    assert docs.column("year").to_pylist() == [2001, 2003]


def test_parquet_keeps_its_own_types(tmp_path: Path) -> None:
    table = pa.table({"doc": ["a", "b", "c", "d"], "body": ["one", None, "three", "four"],
                      "year": pa.array([1, 2, 3, 4], pa.int16())})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, row_group_size=2)
    source = SourceSpec(uri=str(path), id_field="doc", text_fields=["body"])
    plan = plan_source(source)
    assert len(plan.shards) == 2
    assert [(r["position"], r["reason"]) for r in plan.rejects.to_pylist()] == [(1, "null text")]
    docs = _read_all(plan, source)
    assert docs.column("doc_id").to_pylist() == ["a", "c", "d"]
    assert docs.schema.field("year").type == pa.int16()


def test_lance_source(tmp_path: Path) -> None:
    uri = str(tmp_path / "src.lance")
    lance.write_dataset(pa.table({"k": ["x", "y"], "text": ["alpha", "beta"]}), uri)
    source = SourceSpec(uri=uri, id_field="k")
    plan = plan_source(source)
    assert plan.kind == "lance"
    assert _read_all(plan, source).column("text").to_pylist() == ["alpha", "beta"]


def test_text_folder_ids_are_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / "a.md").write_text("# Alpha\nfirst note")
    (root / "sub" / "b.txt").write_text("second note")
    (root / "empty.txt").write_text("   ")
    (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (root / "skip.bin").write_bytes(b"ignored")
    source = SourceSpec(uri=str(root))
    plan = plan_source(source)
    reasons = sorted(r["reason"] for r in plan.rejects.to_pylist())
    assert reasons == ["bad.txt: not valid UTF-8 (byte 0)", "empty text"]
    docs = _read_all(plan, source)
    assert sorted(docs.column("doc_id").to_pylist()) == ["a.md", "sub/b.txt"]


def test_unknown_extension_needs_a_format(tmp_path: Path) -> None:
    path = tmp_path / "data.dat"
    path.write_text("{}\n")
    with pytest.raises(SourceError, match="set source.format"):
        plan_source(SourceSpec(uri=str(path), id_field="_id"))


def test_parquet_with_a_different_schema(tmp_path: Path) -> None:
    # The spec expects `doc` (id) and `body` (text); this file has `uid` and an int `body`.
    table = pa.table({"uid": ["a", "b"], "body": pa.array([1, 2], pa.int64())})
    path = tmp_path / "other.parquet"
    pq.write_table(table, path)
    source = SourceSpec(uri=str(path), id_field="doc", text_fields=["body"])
    plan = plan_source(source)
    assert plan.documents == 0 and plan.rejects.num_rows == 2
    reasons = {r["position"]: r["reason"] for r in plan.rejects.to_pylist()}
    assert reasons == {0: "missing id field 'doc'", 1: "missing id field 'doc'"}


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_a_truncated_compressed_file_keeps_its_records_and_rejects_its_tail(
        tmp_path: Path, codec: str) -> None:
    """An interrupted download: the records before the cut are documents, the unreadable
    tail is one reject naming the last good line, and every pass agrees on it."""
    rows = [{"_id": f"d{i}", "text": f"record {i} " + "words " * (i % 50)} for i in range(3000)]
    suffix = {"gzip": ".gz", "zstd": ".zst"}[codec]
    path = tmp_path / f"cut.jsonl{suffix}"
    with pa.CompressedOutputStream(str(path), codec) as out:
        for row in rows:
            out.write((json.dumps(row) + "\n").encode())
    _cut(path, 0.6)
    write_jsonl(tmp_path / "whole.jsonl", [{"_id": "w", "text": "an intact file"}])
    source = SourceSpec(uri=str(tmp_path), id_field="_id", records_per_shard=500)
    plan = plan_source(source)
    rejects = plan.rejects.to_pylist()
    assert len(rejects) == 1 and plan.reject_reasons == {"truncated compressed file": 1}
    tail = rejects[0]
    assert tail["source"] == str(path) and tail["position_kind"] == "line"
    good = tail["position"] - 1
    assert f"nothing after line {good} can be read" in tail["reason"]
    assert 0 < good < len(rows)  # some records survive, the cut loses the rest
    docs = _read_all(plan, source)
    assert plan.documents == docs.num_rows == good + 1  # the intact file's one too
    assert sorted(docs.column("doc_id").to_pylist()) == sorted(
        ["w", *[f"d{i}" for i in range(good)]])


def test_a_parquet_file_with_a_damaged_footer_is_one_reject(tmp_path: Path) -> None:
    pq.write_table(pa.table({"_id": ["a", "b"], "text": ["one", "two"]}), tmp_path / "ok.parquet")
    pq.write_table(pa.table({"_id": ["c", "d"], "text": ["three", "four"]}),
                   tmp_path / "bad.parquet")
    _cut(tmp_path / "bad.parquet", 0.9)  # the footer's magic bytes are gone
    source = SourceSpec(uri=str(tmp_path), id_field="_id")
    plan = plan_source(source)
    (reject,) = plan.rejects.to_pylist()
    assert reject["source"].endswith("bad.parquet")
    assert reject["reason"].startswith("not a readable Parquet file, rejected whole")
    assert sorted(_read_all(plan, source).column("doc_id").to_pylist()) == ["a", "b"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_hive_partition_folders_become_typed_fields(tmp_path: Path, fmt: str) -> None:
    """`year=2020/lang=en/part-0.<fmt>`: `year` and `lang` are metadata fields of every
    record below them, typed (int64, string), as pyarrow and Ray Data read them; a field
    the file itself holds keeps the file's value."""
    root = tmp_path / "data"
    n = 0
    for year in (2020, 2021):
        for lang in ("en", "de"):
            folder = root / f"year={year}" / f"lang={lang}"
            folder.mkdir(parents=True)
            rows = [{"_id": f"d{n + i}", "text": f"text {n + i}", "kept": year}
                    for i in range(3)]
            n += 3
            if fmt == "parquet":
                pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
            elif fmt == "jsonl":
                write_jsonl(folder / "part-0.jsonl", rows)
            else:
                (folder / "part-0.csv").write_text("_id,text,kept\n" + "".join(
                    f"{r['_id']},{r['text']},{r['kept']}\n" for r in rows))
    source = SourceSpec(uri=str(root), id_field="_id", records_per_shard=2)
    plan = plan_source(source)
    assert plan.rejects.num_rows == 0
    assert plan.metadata.field("year").type == pa.int64()
    assert plan.metadata.field("lang").type == pa.string()
    docs = _read_all(plan, source)
    by_id = {r["doc_id"]: r for r in docs.to_pylist()}
    assert len(by_id) == 12
    assert (by_id["d0"]["year"], by_id["d0"]["lang"]) == (2020, "en")
    assert {(r["year"], r["lang"]) for r in by_id.values()} == {
        (y, lang) for y in (2020, 2021) for lang in ("en", "de")}
    assert all(r["kept"] == r["year"] for r in by_id.values())
