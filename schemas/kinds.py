"""The closed sets of choices a spec and a manifest name (precision, device, pooling...).

They live apart from `schemas.spec` because the embedding operators need them and must
import without pydantic or PyYAML: `benchmarks/gpu.py` runs `operators.embed` on a GPU
machine that has torch and transformers but none of Quiver's other dependencies.
"""

from __future__ import annotations

from typing import Literal

SourceFormat = Literal["auto", "jsonl", "parquet", "csv", "text", "lance"]
Precision = Literal["fp32", "bf16", "fp16"]
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
Pooling = Literal["mean", "cls", "lasttoken"]
ChunkMode = Literal["windows", "truncate"]
AnnIndexType = Literal["IVF_HNSW_SQ", "IVF_RQ", "IVF_PQ", "IVF_SQ", "IVF_FLAT"]
Codec = Literal["float32", "float16", "int8", "binary"]
ScalarIndexType = Literal["BTREE", "BITMAP"]
