"""Vector codecs: Matryoshka truncation, float16, calibrated int8 and packed sign bits.

Encoding runs in torch, on whatever device the embed actor uses, so a GPU actor ships
the compact forms and never the float32 matrix. Decoding and scoring run in numpy on
the query side.

int8 is an affine code per dimension: the calibration sample's [low, high] range is cut
into 255 steps and `code = round((x - low) / step) - 128`, clipped. A float query scores a
code row exactly as it would score the decoded vector, `q · (low + (code + 128) · step)`.
Binary keeps the sign of each dimension, 8 to a byte, most significant bit first (the
order of `numpy.packbits`), and is compared by hamming distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from schemas.records import CODE_COLUMN, CODEC_COLUMNS, code_field, codec_fields, codec_type

if TYPE_CHECKING:
    import torch

    from operators.codecs import Codec
    from schemas.manifest import VectorsManifest

INT8_LEVELS = 255
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class Codebook:
    """Everything an actor or a query needs to encode vectors the table's way."""

    codecs: tuple[str, ...]
    dims: int
    renormalize: bool
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    code: Codec | None = None
    """The table's fitted first-stage code (`operators.codecs`), loaded from its
    codebook file; it fills `vector_code` from the stored (truncated) vectors."""

    @classmethod
    def from_manifest(cls, vectors: VectorsManifest, *, normalize: bool,
                      code: Codec | None = None) -> Codebook:
        low = np.asarray(vectors.int8_low, np.float32) if vectors.int8_low else None
        high = np.asarray(vectors.int8_high, np.float32) if vectors.int8_high else None
        return cls(tuple(vectors.codecs), vectors.dims, normalize and vectors.truncated,
                   low, high, code)

    def fields(self) -> list[pa.Field]:
        """The vector columns this codebook fills, in the table's order."""
        code = [code_field(self.code.name, self.code.nbytes)] if self.code is not None else []
        return [*codec_fields(list(self.codecs), self.dims), *code]

    @property
    def step(self) -> np.ndarray:
        """Width of one int8 level per dimension (never zero)."""
        if self.low is None or self.high is None:
            raise ValueError("this table has no int8 calibration")
        return np.maximum((self.high - self.low) / INT8_LEVELS, 1e-12).astype(np.float32)


def calibrate_int8(sample: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-dimension [min, max] of a sample of (already truncated) vectors.

    Raises:
        ValueError: for an empty sample.

    >>> calibrate_int8(np.array([[0.0, 1.0], [2.0, -1.0]]))
    ([0.0, -1.0], [2.0, 1.0])
    """
    if len(sample) == 0:
        raise ValueError("int8 calibration needs at least one vector")
    sample = np.asarray(sample, dtype=np.float32)
    return sample.min(axis=0).tolist(), sample.max(axis=0).tolist()


def truncate(vectors: torch.Tensor, dims: int, *, renormalize: bool) -> torch.Tensor:
    """Keep the first `dims` dimensions (Matryoshka), re-normalised when the model normalises."""
    import torch

    if vectors.shape[1] == dims:
        return vectors
    out = vectors[:, :dims]
    return torch.nn.functional.normalize(out, p=2, dim=1) if renormalize else out


def encode(vectors: torch.Tensor, book: Codebook) -> dict[str, np.ndarray]:
    """Encode full-size model output (n, model_dim) into each codec's column, on its device."""
    import torch

    x = vectors if vectors.dtype == torch.float32 else vectors.float()
    x = truncate(x, book.dims, renormalize=book.renormalize)
    out: dict[str, np.ndarray] = {}
    for codec in book.codecs:
        if codec == "float32":
            out[CODEC_COLUMNS[codec]] = _host(x)
        elif codec == "float16":
            out[CODEC_COLUMNS[codec]] = _host(x.half())
        elif codec == "int8":
            # Copies: arrays that came through Ray's object store are read-only.
            low = torch.tensor(np.array(book.low), device=x.device)
            step = torch.tensor(np.array(book.step), device=x.device)
            codes = torch.round((x - low) / step) - 128
            out[CODEC_COLUMNS[codec]] = _host(codes.clamp_(-128, 127).to(torch.int8))
        elif codec == "binary":
            weights = 2 ** torch.arange(7, -1, -1, device=x.device, dtype=torch.int32)
            bits = (x > 0).to(torch.int32).reshape(len(x), -1, 8)
            out[CODEC_COLUMNS[codec]] = _host((bits * weights).sum(-1).to(torch.uint8))
        else:  # pragma: no cover - the spec's Literal forbids it
            raise ValueError(f"unknown codec {codec!r}")
    if book.code is not None:  # a projection and a lookup per byte: numpy, on the host
        out[CODE_COLUMN] = book.code.encode(_host(x))
    return out


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array: copied back from a GPU, shared on the CPU (where even
    a no-op `.cpu()` is one more dispatch per block)."""
    return tensor.cpu().numpy() if tensor.is_cuda else tensor.numpy()


def to_arrow(matrix: np.ndarray, codec: str, dims: int) -> pa.FixedSizeListArray:
    """A (n, width) matrix as the codec's fixed-size-list column (zero-copy)."""
    return fixed_size_list(matrix, codec_type(codec, dims))


def fixed_size_list(matrix: np.ndarray, typ: pa.FixedSizeListType) -> pa.FixedSizeListArray:
    """A (n, width) matrix as a column of `typ` (zero-copy where it is contiguous): for
    callers that hold the type already, such as the embed actor once per block."""
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=typ.value_type)
    return pa.FixedSizeListArray.from_arrays(flat, typ.list_size)


def column_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column back as a (n, width) numpy matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def decode_int8(codes: np.ndarray, book: Codebook) -> np.ndarray:
    """int8 codes back to float32 vectors (error at most half a step per dimension)."""
    return book.low + (codes.astype(np.float32) + 128.0) * book.step


def int8_scores(query: np.ndarray, codes: np.ndarray, book: Codebook) -> np.ndarray:
    """`query · decode(codes)` for every row, without materialising the decoded matrix."""
    q = np.asarray(query, np.float32)
    return (codes.astype(np.float32) + 128.0) @ (q * book.step) + float(q @ book.low)


def pack_bits(vectors: np.ndarray) -> np.ndarray:
    """Sign bits of (n, d) float vectors, 8 per byte, as `encode` stores them."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


_BYTE_SIGNS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1
                            ).astype(np.float32) * 2 - 1
"""(256, 8): the +1/-1 signs a packed byte holds, most significant bit first."""


def sign_table(query: np.ndarray) -> np.ndarray:
    """(dims / 8, 256) lookup table of a float query against packed sign bits: entry
    [j, b] is `q[8j:8j+8] . signs(b)`, so a row's asymmetric score `q . sign(x)` is the
    sum of its bytes' entries (`operators.codecs.lookup_scores`).

    >>> sign_table(np.array([1, 2, 0, 0, 0, 0, 0, 4], np.float32))[0, [0, 255, 0b10000001]]
    array([-7.,  7.,  3.], dtype=float32)
    """
    q = np.asarray(query, np.float32).reshape(-1, 8)
    return (q @ _BYTE_SIGNS.T).astype(np.float32)


def sign_cosine(scores: np.ndarray, query: np.ndarray, dims: int) -> np.ndarray:
    """Cosine estimates from asymmetric sign scores `q . sign(x)`: for a unit row whose
    coordinates spread like a Gaussian's, `E|x_i| = sqrt(2 / (pi * dims))`, so
    `q . x ~ (q . sign(x)) * sqrt(2 / (pi * dims))`, divided by |q| and clipped.

    >>> [round(float(c), 3) for c in sign_cosine(np.array([4.0, -40.0]), np.array([2.0]), 8)]
    [0.564, -1.0]
    """
    norm = max(float(np.linalg.norm(query)), 1e-12)
    return np.clip(scores * np.sqrt(2 / (np.pi * dims)) / norm, -1.0, 1.0).astype(np.float32)


def hamming(query_bits: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Differing bits between one packed query and each packed row."""
    return _POPCOUNT[np.bitwise_xor(codes, query_bits)].sum(axis=1, dtype=np.int32)


def cosine_rows(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of one query to each row (zero rows score 0)."""
    q = np.asarray(query, np.float32)
    norms = np.linalg.norm(rows, axis=1) * max(float(np.linalg.norm(q)), 1e-12)
    return (rows @ q) / np.maximum(norms, 1e-12)


def truncate_query(query: np.ndarray, dims: int, *, renormalize: bool) -> np.ndarray:
    """The numpy twin of `truncate` for one query vector."""
    q = np.asarray(query, np.float32)[:dims]
    return q / max(float(np.linalg.norm(q)), 1e-12) if renormalize else q


def bytes_per_vector(codec: str, dims: int) -> float:
    """Stored bytes of one vector in a codec.

    >>> [bytes_per_vector(c, 384) for c in ("float32", "float16", "int8", "binary")]
    [1536.0, 768.0, 384.0, 48.0]
    """
    return dims * {"float32": 4.0, "float16": 2.0, "int8": 1.0, "binary": 0.125}[codec]


def sample_positions(total: int, wanted: int) -> Sequence[int]:
    """`wanted` positions spread evenly over `total` (all of them when total <= wanted).

    >>> list(sample_positions(10, 3))
    [0, 3, 6]
    """
    if total <= wanted:
        return range(total)
    return [i * total // wanted for i in range(wanted)]
