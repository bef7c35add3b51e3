"""A Quiver table opened for search (`open_table`): dense, full-text and hybrid search,
filters, time travel, and the query model shared by every open version.

It imports nothing that runs jobs, so the job side (a cut-over's comparison report)
and the server can open tables without importing the job machinery; `jobs.api`
re-exports it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow.compute as pc

from jobs._tags import current_version
from operators.codebooks import load_codebook
from operators.embed import Embedder, TextEncoder
from operators.filters import compile_filter
from operators.fulltext import HYBRID_CANDIDATES, RRF_K, fts_candidates, rrf_fuse
from operators.model import describe_model
from operators.qbnorm import QBNORM_POOL, QueryBank, load_bank
from operators.search import DEFAULT_COLUMNS, VectorSearcher, take_rows, top_documents
from operators.stage_clock import stage
from schemas.errors import ManifestMismatchError, QueryError, TableError
from schemas.manifest import TableManifest
from schemas.records import CODE_COLUMN, CODEC_COLUMNS, HASH_COLUMNS
from schemas.spec import ModelSpec

SEARCH_MODES = ("dense", "fts", "hybrid")
MAX_K = 10_000
MAX_BATCH = 1_000
Where = Mapping[str, Any] | pc.Expression | None


@dataclass(frozen=True)
class Hit:
    """One search result: a chunk and its similarity to the query."""

    id: str
    doc_id: str
    chunk: int
    score: float
    text: str
    fields: dict = field(default_factory=dict)
    """Extra columns the search asked for (metadata such as `year`)."""


class Table:
    """A Quiver table opened for search, with its own model loaded once.

    Args:
        uri: The Lance dataset.
        model: A local model folder to use instead of the manifest's name (for a table
            copied to another machine); its weights must hash to the manifest's.
        version: A version number or a tag name to read (time travel); None is the
            version the `current` tag names (the last complete, indexed one), or the
            latest for a table without it.
        storage_options: Object-store options (endpoint, credentials) for `uri`.
    """

    def __init__(self, uri: str | Path, *, model: str | None = None,
                 version: int | str | None = None,
                 storage_options: dict[str, str] | None = None) -> None:
        self.uri = str(uri)
        try:
            self.ds = lance.dataset(self.uri, version=version,
                                    storage_options=storage_options or None)
        except (ValueError, OSError) as err:
            raise TableError(f"{self.uri}: cannot open as a Lance table: {err}") from None
        if version is None and (pinned := current_version(self.ds)) is not None:
            self.ds = self.ds.checkout_version(pinned)  # the last complete, indexed version
        self.manifest = TableManifest.from_schema(self.ds.schema, where=self.uri)
        m = self.manifest.model
        model_info = describe_model(ModelSpec(
            name=model or m.name, pooling=m.pooling, normalize=m.normalize,
            max_tokens=m.max_tokens, query_prefix=m.query_prefix,
            document_prefix=m.document_prefix,
        ))
        if model_info.weights_sha256 != m.weights_sha256:
            raise ManifestMismatchError(
                f"{self.uri} was embedded with {m.name} (weights sha256 "
                f"{m.weights_sha256[:12]}…) but {model or m.name} has weights "
                f"{model_info.weights_sha256[:12]}…; query it with the same model"
            )
        if model_info.dim != m.dim:
            raise ManifestMismatchError(
                f"{self.uri} holds {m.dim}-d vectors but the model gives {model_info.dim}-d"
            )
        self._encoder = shared_encoder(model_info)
        self._storage_options = storage_options
        self._bank: QueryBank | None = None
        code = self.manifest.vectors.code
        self.searcher = VectorSearcher(
            self.ds, self.manifest,
            code=(lambda: load_codebook(self.uri, code.sha256, storage_options))
            if code is not None else None)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """Query vectors built exactly as the table's documents were (prefix, pooling)."""
        with stage("embed"):
            return self._encoder.encode(texts, kind="query")

    def _filter(self, mode: str, k: int, where: Where) -> pc.Expression | None:
        """Check mode and k; compile a structured filter against this table's schema."""
        if mode not in SEARCH_MODES:
            raise QueryError(f"unknown search mode {mode!r}; use one of "
                             f"{', '.join(SEARCH_MODES)}")
        if not 1 <= k <= MAX_K:
            raise QueryError(f"Got k={k}. Must be between 1 and {MAX_K}.")
        if where is None or isinstance(where, pc.Expression):
            return where
        return compile_filter(where, self.ds.schema)

    def query_bank(self) -> QueryBank:
        """The table's QB-Norm bank (`operators.qbnorm`), loaded on first use.

        Raises:
            QueryError: the table has none.
            ManifestMismatchError: it was built for another embedding.
        """
        if self._bank is None:
            self._bank = load_bank(self.uri, self.manifest.embedding_fingerprint(),
                                   self._storage_options)
        return self._bank

    def qbnorm_candidates(self, vector: np.ndarray, k: int,
                          **dense) -> tuple[np.ndarray, np.ndarray]:
        """The dense candidates re-ranked by QB-Norm: `QBNORM_POOL` (at least k) of them
        by the usual search, their vectors scored against the bank."""
        bank = self.query_bank()
        row_ids, scores = self.searcher.candidates(vector, k=max(k, QBNORM_POOL), **dense)
        with stage("rescore"):
            ids, rows = self.searcher.unit_vectors(row_ids)
            scores = bank.rescore(ids, scores, rows)
            order = np.argsort(-scores, kind="stable")[:k]
        return row_ids[order], scores[order].astype(np.float32)

    def _candidates(self, text: str | None, vector: np.ndarray | None, *, k: int,
                    mode: str = "dense", using: str = "auto", rescore: int | None = None,
                    depth: int | None = None, exact: bool = False, where: Where = None,
                    rrf_k: int = RRF_K, qbnorm: bool = False,
                    refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        expr = self._filter(mode, k, where)
        if mode != "dense" and text is None:
            raise QueryError(f"mode {mode!r} needs the query text, not only a vector")
        if qbnorm and mode != "dense":
            raise QueryError(f"qbnorm re-ranks dense searches; mode {mode!r} has none")
        dense = dict(using=using, rescore=rescore, depth=depth, exact=exact, where=expr,
                     refine_factor=refine)
        if mode == "dense" and qbnorm:
            return self.qbnorm_candidates(vector, k, **dense)
        if mode == "dense":
            return self.searcher.candidates(vector, k=k, **dense)
        if mode == "fts":
            with stage("first_stage"):
                return fts_candidates(self.ds, text, k=k, where=expr)
        n = max(k, HYBRID_CANDIDATES)
        dense_ids, _ = self.searcher.candidates(vector, k=n, **dense)
        with stage("first_stage"):
            text_ids, _ = fts_candidates(self.ds, text, k=n, where=expr)
        return rrf_fuse([dense_ids, text_ids], k=k, rrf_k=rrf_k)

    def _check_columns(self, columns: Sequence[str]) -> None:
        """Refuse, by name, a requested column the table does not have (or that holds
        vectors or hashes, which hits do not carry)."""
        names = set(self.ds.schema.names) - set(HIDDEN_COLUMNS)
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise QueryError(f"unknown column {unknown[0]!r} in columns; this table returns "
                             + ", ".join(sorted(names)))

    def _search(self, text: str | None, vector: np.ndarray | None, *, k: int,
                columns: Sequence[str] = DEFAULT_COLUMNS, mode: str = "dense",
                where: Where = None, **options) -> list[Hit]:
        self._check_columns(columns)
        qbnorm = options.pop("qbnorm", False)
        if mode == "dense" and not qbnorm:  # one Lance call for float search, no row ids
            expr = self._filter(mode, k, where)
            refine = options.pop("refine", None)
            rows = self.searcher.search(vector, k=k, columns=columns, where=expr,
                                        refine_factor=refine, **options)
        else:
            ids, scores = self._candidates(text, vector, k=k, mode=mode, where=where,
                                           qbnorm=qbnorm, **options)
            with stage("fetch"):
                rows = take_rows(self.ds, ids, scores, columns)
        return [Hit(h["id"], h["doc_id"], h["chunk"], float(h["score"]), h["text"],
                    {c: h[c] for c in columns if c not in DEFAULT_COLUMNS})
                for h in rows.to_pylist()]

    def search(self, text: str, *, k: int = 10, mode: str = "dense", using: str = "auto",
               rescore: int | None = None, depth: int | None = None, exact: bool = False,
               where: Where = None, columns: Sequence[str] = DEFAULT_COLUMNS,
               rrf_k: int = RRF_K, qbnorm: bool = False,
               refine: int | None = None) -> list[Hit]:
        """Top-k chunks for a query text.

        Args:
            text: The query.
            k: Hits wanted (at most `MAX_K`).
            mode: 'dense' (vectors), 'fts' (BM25 on `text`), or 'hybrid' (both, fused by
                reciprocal rank; see `operators.fulltext`).
            using: Dense first-stage column: 'float', 'int8', 'binary', 'code' (the
                table's fitted code) or 'auto'.
            rescore: Candidates per hit re-scored with the best column (1 = off).
            depth: Candidates re-scored, as a count instead of `rescore` per hit.
            exact: Skip ANN indices.
            where: A filter, `{"year": {"gte": 2020}, "lang": {"in": ["en", "de"]}}`
                (see `operators.filters`), applied before the search.
            columns: Extra columns to return land in `Hit.fields`.
            rrf_k: Reciprocal-rank-fusion constant for hybrid search
                (see `operators.fulltext`).
            qbnorm: Re-rank a dense search's best `QBNORM_POOL` candidates against the
                table's query bank (`operators.qbnorm`; scores become QB-Norm's).
            refine: Lance's refine factor through a compact index: rows per candidate
                that a Lance-indexed code ranks by its stored projection (default
                `operators.search.CODE_REFINE`, 4; 8 for steadier quality, about 10-15%
                more search time at 1M rows), or that a float search through IVF_PQ /
                IVF_RQ rescores.
        """
        vector = None if mode == "fts" else self.embed_queries([text])[0]
        extra = {"rrf_k": rrf_k} if mode == "hybrid" else {}
        return self._search(text, vector, k=k, mode=mode, using=using, rescore=rescore,
                            depth=depth, exact=exact, where=where, qbnorm=qbnorm,
                            refine=refine, columns=_with_defaults(columns), **extra)

    def search_vector(self, vector: np.ndarray, *, k: int = 10, using: str = "auto",
                      rescore: int | None = None, depth: int | None = None,
                      exact: bool = False, where: Where = None,
                      columns: Sequence[str] = DEFAULT_COLUMNS,
                      qbnorm: bool = False, refine: int | None = None) -> list[Hit]:
        """Top-k chunks for a query vector (model dims; cut to the table's own dims)."""
        return self._search(None, np.asarray(vector, np.float32), k=k, mode="dense",
                            using=using, rescore=rescore, depth=depth, exact=exact,
                            where=where, qbnorm=qbnorm, refine=refine,
                            columns=_with_defaults(columns))

    def search_batch(self, texts: Sequence[str], *, k: int = 10, mode: str = "dense",
                     **options) -> list[list[Hit]]:
        """Many queries: embedded together in one batch, then searched one by one."""
        if len(texts) > MAX_BATCH:
            raise QueryError(f"{len(texts)} queries in one batch; the limit is {MAX_BATCH}")
        options["columns"] = _with_defaults(options.get("columns", ()))
        if mode == "fts":
            return [self._search(t, None, k=k, mode=mode, **options) for t in texts]
        vectors = self.embed_queries(list(texts)) if texts else []
        return [self._search(t, v, k=k, mode=mode, **options)
                for t, v in zip(texts, vectors, strict=True)]

    def search_documents(self, vectors: np.ndarray, *, k: int = 100,
                         chunks_per_query: int | None = None, mode: str = "dense",
                         texts: Sequence[str] | None = None,
                         **options) -> list[list[tuple[str, float]]]:
        """Top-k documents per query: chunk hits folded to their document (max score)."""
        chunks_per_query = chunks_per_query or max(k * 3, 100)
        out = []
        for i, v in enumerate(vectors):
            text = texts[i] if texts is not None else None

            def fetch(n: int, text=text, v=v) -> tuple[list[str], list[float]]:
                ids, scores = self._candidates(text, v, k=n, mode=mode, **options)
                hits = take_rows(self.ds, ids, scores, ("doc_id",))
                return hits.column("doc_id").to_pylist(), hits.column("score").to_pylist()

            out.append(top_documents(fetch, k=k, chunks=chunks_per_query))
        return out


def _with_defaults(columns: Sequence[str]) -> tuple[str, ...]:
    return (*DEFAULT_COLUMNS, *(c for c in columns if c not in DEFAULT_COLUMNS))


HIDDEN_COLUMNS = (*dict.fromkeys(CODEC_COLUMNS.values()), CODE_COLUMN, *HASH_COLUMNS)
"""Columns a hit never carries: vectors and hashes (bytes, not answers)."""

_ENCODERS: dict[tuple, TextEncoder] = {}
_ENCODER_LOCKS: dict[tuple, threading.Lock] = {}
_ENCODERS_LOCK = threading.Lock()


def shared_encoder(info) -> TextEncoder:
    """The query encoder for a model, loaded once per process and weights hash however
    many tables or versions use it (a server that follows reindexes would otherwise
    gain a model copy per version). Concurrent first requests wait for one load; loads
    of different models do not wait for each other."""
    key = (info.path, info.weights_sha256, info.pooling, info.normalize, info.max_tokens,
           info.query_prefix, info.document_prefix)
    with _ENCODERS_LOCK:
        if key in _ENCODERS:
            return _ENCODERS[key]
        lock = _ENCODER_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _ENCODERS:
            _ENCODERS[key] = TextEncoder(Embedder(info, precision="fp32"))
        return _ENCODERS[key]


def model_loads() -> int:
    """Query models this process has loaded (the server's `quiver_model_loads_total`):
    one per encoder held, since none is ever dropped."""
    return len(_ENCODERS)


def open_table(uri: str | Path, *, model: str | None = None,
               version: int | str | None = None,
               storage_options: dict[str, str] | None = None) -> Table:
    """Open a Quiver table for search (see `Table`)."""
    return Table(uri, model=model, version=version, storage_options=storage_options)
