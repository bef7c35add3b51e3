"""Querybank normalisation (QB-Norm, Bogolin et al. 2022) as an optional re-ranking.

Some rows ("hubs") come near many queries whatever they ask. QB-Norm re-scores a query's
candidates against a bank of other queries, so a row near many bank queries loses
weight. With similarity s and bank B, the inverted softmax scores a row x as

    exp(beta * s(q, x)) / sum_b exp(beta * s(b, x)),

here as its logarithm, `beta * s(q, x) - log sum_b exp(beta * s(b, x))`, which ranks
alike and stays finite. The dynamic variant (DIS, the paper's default, used here) applies
it to a query only when the query's best raw candidate is in the bank's activation set
(the rows some bank query ranks first); otherwise the raw scores stand.

It is off unless a search asks for it (`qbnorm=True`). Measured with
`benchmarks/qbnorm.py` (best beta each, nDCG@10): scifact 0.6568 -> 0.6454 (its 809
train queries as the bank), cranfield 0.3898 -> 0.3882, limit-small 0.3138 -> 0.3371
(half of the test queries as the other half's bank). So it helps one set of three; the
quality report measures it on a table's own qrels before anyone turns it on.

The bank lives beside the table (`<table>.qbnorm.npz`, one per table, replaced when
rebuilt): its query vectors embedded as the table embeds queries, beta, the chunk ids
of the activation set, and the embedding fingerprint it was built for (a bank for
another embedding is refused).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from operators.filesystems import beside, resolve
from schemas.errors import ManifestMismatchError, QueryError

QBNORM_POOL = 100
"""Candidates a QB-Norm search re-ranks (at least k)."""
DEFAULT_BETA = 20.0
SUFFIX = ".qbnorm.npz"


@dataclass(frozen=True)
class QueryBank:
    """A table's query bank: what QB-Norm needs at query time.

    Attributes:
        vectors: (queries, dims) float32, embedded and cut to the table's dims as its
            own queries are.
        beta: The softmax temperature.
        activated: Chunk ids some bank query ranks first (DIS's activation set).
        fingerprint: The table's embedding fingerprint when the bank was built.
    """

    vectors: np.ndarray
    beta: float
    activated: frozenset[str]
    fingerprint: str

    def log_norm(self, rows: np.ndarray) -> np.ndarray:
        """`log sum_b exp(beta * s(b, x))` for each row x, computed stably."""
        z = self.beta * (np.asarray(rows, np.float32) @ self.vectors.T).astype(np.float64)
        top = z.max(axis=1)
        return top + np.log(np.exp(z - top[:, None]).sum(axis=1))

    def rescore(self, ids: Sequence[str], scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The candidates' scores after DIS: their log inverted-softmax scores when the
        best raw candidate is activated, else the raw scores.

        Args:
            ids: The candidates' chunk ids.
            scores: Their raw similarities to the query.
            rows: Their vectors (as `scores` was computed from).
        """
        scores = np.asarray(scores, np.float64)
        if len(ids) == 0 or ids[int(np.argmax(scores))] not in self.activated:
            return scores
        return self.beta * scores - self.log_norm(rows)

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(out, vectors=self.vectors, beta=np.array(self.beta),
                 activated=np.array(sorted(self.activated), dtype=np.str_),
                 fingerprint=np.array(self.fingerprint))
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> QueryBank:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(np.asarray(z["vectors"], np.float32), float(z["beta"]),
                       frozenset(str(i) for i in z["activated"]), str(z["fingerprint"]))


def bank_uri(table_uri: str) -> str:
    """Where a table's query bank lives.

    >>> bank_uri("s3://b/t.lance/"), bank_uri("/w/t.lance")
    ('s3://b/t.qbnorm.npz', '/w/t.qbnorm.npz')
    """
    return beside(table_uri.rstrip("/"), SUFFIX)


def save_bank(table_uri: str, bank: QueryBank,
              storage_options: Mapping[str, str] | None = None) -> str:
    """Write (or replace) the table's bank in one object write; returns where."""
    uri = bank_uri(table_uri)
    fs, path = resolve(uri, storage_options)
    with fs.open_output_stream(path) as out:
        out.write(bank.to_bytes())
    return uri


def load_bank(table_uri: str, fingerprint: str,
              storage_options: Mapping[str, str] | None = None) -> QueryBank:
    """The table's bank, checked against the table's embedding.

    Raises:
        QueryError: the table has no bank.
        ManifestMismatchError: the bank was built for another embedding.
    """
    uri = bank_uri(table_uri)
    fs, path = resolve(uri, storage_options)
    try:
        with fs.open_input_stream(path) as f:
            bank = QueryBank.from_bytes(f.read())
    except (FileNotFoundError, OSError):
        raise QueryError(f"{table_uri} has no QB-Norm query bank ({uri}); build one with "
                         "`quiver table qbnorm TABLE --queries FILE`") from None
    if bank.fingerprint != fingerprint:
        raise ManifestMismatchError(
            f"{uri} was built for another embedding of this table ({bank.fingerprint[:12]}"
            f", the table is {fingerprint[:12]}); build it again with `quiver table qbnorm`")
    return bank
