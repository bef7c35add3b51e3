"""Every example spec in `examples/` parses, and each local one plans to the documents its
data holds (no Ray, no model: `plan_source` runs the job's three planning passes here).
`tests/test_docs.py` runs them end to end."""

from __future__ import annotations

import gzip
import json

import lance
import pyarrow.dataset as pads
import pytest
from conftest import REPO

from operators.sources.plan import plan_source
from schemas.spec import load_spec

EXAMPLES = REPO / "examples"
with gzip.open(EXAMPLES / "data" / "stdlib.jsonl.gz", "rt") as _f:
    ROWS = len(_f.read().splitlines())


@pytest.mark.parametrize("name,documents", [
    ("jsonl-gz", ROWS), ("parquet", ROWS), ("csv", ROWS), ("text-folder", 12)])
def test_local_examples_plan_to_their_documents(name, documents, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # example paths are relative to the repository root
    spec = load_spec(EXAMPLES / f"{name}.yaml")
    plan = plan_source(spec.source)
    assert plan.documents == documents and plan.rejected == 0
    if spec.source.metadata_fields:
        assert set(plan.metadata.names) == set(spec.source.metadata_fields)


def test_the_lance_source_example_plans_from_a_lance_dataset(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    lance.write_dataset(pads.dataset(str(EXAMPLES / "data" / "parquet")).to_table(),
                        "warehouse/source.lance")
    spec = load_spec(EXAMPLES / "lance-source.yaml")
    assert plan_source(spec.source).documents == ROWS


def test_every_example_parses_and_the_s3_one_names_its_store() -> None:
    specs = {p.stem: load_spec(p) for p in EXAMPLES.glob("*.yaml")}
    assert {"jsonl-gz", "parquet", "csv", "text-folder", "lance-source", "s3",
            "scifact"} <= set(specs)
    s3 = specs["s3"]
    assert s3.source.uri.startswith("s3://") and s3.table.startswith("s3://")
    assert s3.write.storage_options["aws_region"] == "us-east-1"
    assert json.loads(json.dumps(s3.model_dump()))["kind"] == "embed"
