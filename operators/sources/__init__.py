"""Source formats, one module each over `base`: JSON Lines, CSV, Parquet, text, Lance."""

from __future__ import annotations

from operators.sources.base import SourceFormat
from operators.sources.csv import CsvFormat
from operators.sources.jsonl import JsonlFormat
from operators.sources.lance import LanceFormat
from operators.sources.parquet import ParquetFormat
from operators.sources.text import TextFormat
from schemas.source import ShardKind

FORMATS: dict[ShardKind, SourceFormat] = {
    f.kind: f for f in (JsonlFormat(), ParquetFormat(), CsvFormat(), TextFormat(),
                        LanceFormat())
}
"""Every readable format by kind; listing tries their suffixes in this order."""
