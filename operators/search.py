"""Nearest-neighbour search over a Quiver table: one stage or two.

The first stage runs on the most compact column the mode names: float vectors through
Lance (with or without their ANN index), or a numpy scan of the int8 codes or the sign
bits, held in memory up to 256 MiB and streamed batch by batch with a running top-k past
that (Lance has no int8 distance, and no distance between a float query and bits), or of
the table's fitted code, held per fragment in a process-wide cache that every open
version shares (`operators.fragment_codes`, up to QUIVER_CODE_HOLD_BYTES). A
Lance-indexed code (`pca-rq`) is searched by Lance instead: its IVF_RQ index over the
stored projection, which Lance's index cache holds once per process.
The second stage rescoring takes `rescore * k` candidates and scores them against the
float query with the best column the table holds: float vectors, else decoded int8.

The binary first stage is asymmetric: the float query scores each row's sign bits as
`q . sign(x)` (a table lookup per code byte), never binarised itself. Among 1M
distractors, rescoring 100 candidates, it keeps 100% / 95.6% / 91.6% of float nDCG@10 on
scifact / cranfield / limit-small, where hamming between binarised queries and rows kept
96.8% / 87.0% / 61.7% (`benchmarks/codecs.py`). With an IVF hamming index on the bits
(large tables) and no `exact`, the index picks `BITS_POOL` times the candidates by
hamming and the asymmetric score keeps the best of them.

Scores are similarities (higher is closer): `dot` for normalised tables, cosine
otherwise, and for sign bits alone an estimate of the cosine (`sign_cosine`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.codecs import Codec, lookup_scores
from operators.fragment_codes import SHARED, FragmentCodes
from operators.quantize import (
    Codebook,
    column_matrix,
    cosine_rows,
    decode_int8,
    int8_scores,
    pack_bits,
    sign_cosine,
    sign_table,
    truncate_query,
)
from operators.stage_clock import stage
from schemas.errors import QueryError
from schemas.manifest import TableManifest
from schemas.records import BITS_COLUMN, CODE_COLUMN, INT8_COLUMN, VECTOR_COLUMN

DEFAULT_COLUMNS = ("id", "doc_id", "chunk", "text")
DEFAULT_RESCORE = 4
"""Candidates per wanted hit for two-stage search (binary or int8 first stage)."""
INDEX_REFINE = 10
"""Lance's refine_factor for a float search through a compact index (IVF_PQ, IVF_RQ):
k * 10 candidates by the index's code are rescored from the float column. At 1M rows,
recall@10 of IVF_RQ (1 bit, 48 B) goes from 0.551 to 0.984 with it (p50 5.5 ms, the
default IVF_HNSW_SQ 5.9 ms) and IVF_PQ (24 B) from 0.180 to 0.603
(benchmarks/first_stage.py)."""
COMPACT_INDICES = frozenset({"IVF_PQ", "IVF_RQ"})
CODE_CACHE_BYTES = 256 << 20
"""A code column (int8 or bits) is held in memory up to this size; past it each search
streams it."""
CODE_SCAN_ROWS = 65_536
"""Rows per batch of a streamed code scan."""
BITS_POOL = 4
"""With a hamming index, candidates it returns per candidate the asymmetric score keeps."""
Using = Literal["auto", "float", "int8", "binary", "code"]
USING: tuple[str, ...] = ("auto", "float", "int8", "binary", "code")


def default_nprobes(rows: int) -> int:
    """IVF partitions probed per query: enough to scan about 4,000 rows, at least 20.

    With the default sqrt(rows) partitions that is max(20, 4000 / sqrt(rows)), capped at
    the partition count. Measured recall@10 against exact search: scifact chunks (9.6k
    rows, 98 partitions) 0.957 / 0.977 / 0.985 at 20 / 30 / 40 probes; 1M embedding-like
    vectors (1,000 partitions) 0.969 at 20 probes, the same as Lance's adaptive default
    at 3.4x the latency (benchmarks/query.py, benchmarks/ann.py).

    >>> default_nprobes(1_000_000), default_nprobes(9_631), default_nprobes(400)
    (20, 41, 20)
    """
    rows = max(rows, 1)
    return min(max(20, math.ceil(4000 / math.sqrt(rows))), max(20, int(math.sqrt(rows))))


CODE_PROBE_SHARE = 0.4
"""A Lance-indexed code (`pca-rq`) probes this share of its index's partitions. Real
queries are not drawn from the rows' distribution: among 1M distractors the chunks they
should find sit in partitions their centre ranks low. With `CODE_REFINE`, `pca-rq` at
24 B kept 95.1% of float nDCG@10 on scifact probing 10% of 250 partitions and 96.9-100.2%
(median 99.1% over 11 index builds) probing 40%, where 60% and all of them kept the same
(docs/benchmarks.md). Each probe scans its rows' codes, so a search costs this share of
the table's codes: the latency grows with the rows."""
CODE_REFINE = 4
"""Lance's refine_factor for a code search: the index's RaBitQ estimate picks
`CODE_REFINE * k` rows, the stored projection (`vector_code`, read by row id) ranks them
exactly and keeps `k`, and the float column rescores those. Among 1M distractors, at 40%
of 250 partitions, it took scifact from 94.1-97.1% of float nDCG@10 to 96.9-100.2%
(median 99.1%); 8 kept 99.0-99.7% for 2-5 ms more per search at depth 100, 16 kept
99.6-100% at twice the latency."""


MAX_REFINE = 64
"""The largest refine factor a query may ask for: Lance reads `refine * depth` rows by row
id for it, so 64 at the largest depth is already a long scan."""


def _check_refine(refine: int | None) -> None:
    if refine is not None and not 1 <= refine <= MAX_REFINE:
        raise QueryError(f"Got refine={refine}. Must be between 1 and {MAX_REFINE}.")


def code_nprobes(partitions: int) -> int:
    """IVF partitions a Lance-indexed code's search probes: `CODE_PROBE_SHARE` of them,
    and at least 20 as the float default (all of a small table's).

    >>> code_nprobes(250), code_nprobes(2_500), code_nprobes(24), code_nprobes(1)
    (100, 1000, 20, 1)
    """
    return min(partitions, max(20, math.ceil(CODE_PROBE_SHARE * partitions)))


class VectorSearcher:
    """Search one version of a table; caches a code column (int8 or bits) the first scan
    of it loads when it fits `cache_bytes`, and streams it per search when it does not.

    Args:
        ds: The Lance dataset (a fixed version).
        manifest: Its manifest (codecs, dims, int8 ranges, metric).
        cache_bytes: The largest code column kept in memory (256 MiB: 700k 384-d int8
            rows, 5.6M rows of 384 bits). A bigger one is scanned batch by batch on
            each search.
    """

    def __init__(self, ds: lance.LanceDataset, manifest: TableManifest, *,
                 cache_bytes: int = CODE_CACHE_BYTES,
                 code: Callable[[], Codec] | None = None,
                 shared: FragmentCodes = SHARED) -> None:
        self.ds = ds
        self.shared = shared
        self._load_code = code
        self._code: Codec | None = None
        self._code_fragments: list[tuple[tuple, object]] | None = None
        """(cache key, fragment) of each fragment's code file: listed once, the version
        being fixed, not on every search."""
        self.manifest = manifest
        self.book = Codebook.from_manifest(manifest.vectors, normalize=manifest.model.normalize)
        self.codecs = frozenset(manifest.vectors.codecs)
        self.has_float = bool(self.codecs & {"float32", "float16"})
        self._held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.cache_bytes = cache_bytes
        self.row_count = ds.count_rows()
        self.nprobes = default_nprobes(self.row_count)
        # read once: the version is fixed, and listing indices reads the manifest's
        # index section, which a binary search per query should not repeat
        indices = ds.list_indices()
        self.indexed = frozenset(f for i in indices for f in i["fields"])
        self.refine_factor = next((INDEX_REFINE for i in indices if i["fields"] == [VECTOR_COLUMN]
                                   and i["type"] in COMPACT_INDICES), None)
        """Lance's refine for float searches through the index: INDEX_REFINE when the
        index keeps a compact code (IVF_PQ, IVF_RQ), else none."""
        self._code_index = next((i["name"] for i in indices if i["fields"] == [CODE_COLUMN]),
                                None)
        self._code_probes: int | None = None

    def default_mode(self) -> str:
        """The fitted code's first stage when the table has one, else binary when it has
        bits, else float, else int8."""
        if self.manifest.vectors.code is not None:
            return "code"
        if "binary" in self.codecs:
            return "binary"
        return "float" if self.has_float else "int8"

    def modes(self) -> list[str]:
        """The `using` choices this table supports (besides 'auto')."""
        out = ["float"] if self.has_float else []
        code = ["code"] if self.manifest.vectors.code is not None else []
        return out + [m for m in ("int8", "binary") if m in self.codecs] + code

    def rescore_column(self) -> str | None:
        """The column second-stage rescoring reads: float, else int8, else none."""
        if self.has_float:
            return VECTOR_COLUMN
        return INT8_COLUMN if "int8" in self.codecs else None

    def query_vector(self, query: np.ndarray) -> np.ndarray:
        """A model-size (or already table-size) query cut to the table's dims."""
        return truncate_query(query, self.book.dims, renormalize=self.book.renormalize)

    def resolve(self, using: str, *, k: int, rescore: int | None) -> str:
        """Check the request and name the first stage it runs ('float', 'int8', 'binary',
        'code').

        Raises:
            QueryError: for k < 1, rescore < 1, an unknown choice, or a column the table
                does not store.
        """
        if k < 1:
            raise QueryError(f"Got k={k}. Must be at least 1.")
        if rescore is not None and rescore < 1:
            raise QueryError(f"Got rescore={rescore}. Must be at least 1 (1 = no rescoring).")
        if using not in USING:
            raise QueryError(f"unknown vector column choice {using!r}; use one of "
                             f"{', '.join(USING)}")
        mode = self.default_mode() if using == "auto" else using
        if mode not in self.modes():
            raise QueryError(
                f"this table stores {sorted(self.codecs)}, which cannot search "
                f"using={mode!r}; it supports {self.modes()}"
            )
        return mode

    def search(self, query: np.ndarray, *, k: int, columns: Sequence[str] = DEFAULT_COLUMNS,
               **options) -> pa.Table:
        """Top-k rows, best first, with a `score` column (options as in `candidates`).

        A float search is one Lance call that returns the columns with the distances; a
        two-stage search fetches the winners' columns by row id after rescoring.
        """
        mode = self.resolve(options.get("using", "auto"), k=k, rescore=options.get("rescore"))
        if mode == "float":  # `candidates` checks the other modes' refine
            _check_refine(options.get("refine_factor"))
            with stage("first_stage"):  # finds and fetches in one Lance call
                hits = self._float_hits(self.query_vector(query), k, columns=columns,
                                        **{key: options.get(key) for key in
                                           ("exact", "nprobes", "refine_factor", "where")})
            score = pc.subtract(pa.scalar(1.0, pa.float32()), hits.column("_distance"))
            return hits.drop_columns(["_distance"]).append_column("score", score)
        row_ids, scores = self.candidates(query, k=k, **options)
        with stage("fetch"):
            return self.rows(row_ids, scores, columns)

    def candidates(self, query: np.ndarray, *, k: int, using: str = "auto",
                   rescore: int | None = None, depth: int | None = None,
                   exact: bool = False, nprobes: int | None = None,
                   refine_factor: int | None = None,
                   where: pc.Expression | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row ids and scores of the top-k rows, best first.

        Args:
            query: The float query vector (model dims; truncated here when the table is).
            k: Hits wanted.
            using: Which column the first stage reads: 'float', 'int8', 'binary',
                'code' (the table's fitted code, `vectors.code`), or 'auto' (see
                `default_mode`).
            rescore: Candidates per hit for the second stage; 1 disables rescoring.
                None means `DEFAULT_RESCORE` for int8/binary/code first stages.
            depth: Candidates the first stage hands to rescoring, as a count (at least
                k), instead of `rescore` times k; float first stages ignore it.
            exact: Ignore ANN indices (a flat scan).
            nprobes, refine_factor: Passed to Lance's ANN search: on the float column
                (refine_factor None means INDEX_REFINE through a compact index), or on
                a Lance-indexed code (None means CODE_REFINE: that many rows per
                candidate ranked by their stored projection; 8 kept 99% of float
                nDCG@10 in every build measured, 4 in most, docs/search.md).
            where: A compiled filter (`operators.filters.compile_filter`), applied before
                the nearest-neighbour search (prefiltering), so k matching rows come back
                whenever k rows match.

        Raises:
            QueryError: for k < 1, an unknown mode, or a mode the table cannot serve.
        """
        mode = self.resolve(using, k=k, rescore=rescore)
        _check_refine(refine_factor)
        q = self.query_vector(query)
        if mode == "float":
            with stage("first_stage"):
                row_ids, scores = self._lance_float(q, k, exact=exact, nprobes=nprobes,
                                                    refine_factor=refine_factor, where=where)
        else:
            if depth is not None and depth < 1:
                raise QueryError(f"Got depth={depth}. Must be at least 1.")
            factor = DEFAULT_RESCORE if rescore is None else rescore
            want = max(depth, k) if depth is not None else k * factor if factor > 1 else k
            with stage("first_stage"):
                if mode == "binary":
                    row_ids, scores = self._bits_stage(q, want, exact=exact, where=where)
                elif mode == "code" and self.code().lance_indexed:
                    row_ids, scores = self._lance_code(q, want, exact=exact, nprobes=nprobes,
                                                       refine_factor=refine_factor,
                                                       where=where)
                elif mode == "code":
                    row_ids, scores = self._scan(CODE_COLUMN, q, want, where=where)
                else:
                    row_ids, scores = self._scan(INT8_COLUMN, q, want, where=where)
            best = self.rescore_column()
            rescoring = want > k or factor > 1
            if rescoring and best is not None and not (mode == "int8" and best == INT8_COLUMN):
                with stage("rescore"):
                    row_ids, scores = self._rescore(q, row_ids)
        order = np.argsort(-scores, kind="stable")[:k]
        return row_ids[order], scores[order]

    def _nearest(self, nearest: dict, where: pc.Expression | None,
                 columns: Sequence[str] = ()) -> pa.Table:
        return self.ds.to_table(nearest=nearest, columns=[*columns, "_distance"],
                                with_row_id=not columns, filter=where,
                                prefilter=where is not None)

    def _float_hits(self, q: np.ndarray, k: int, *, exact: bool | None, nprobes: int | None,
                    refine_factor: int | None, where: pc.Expression | None,
                    columns: Sequence[str] = ()) -> pa.Table:
        nearest: dict = {"column": VECTOR_COLUMN, "q": q, "k": k,
                         "metric": self.manifest.metric, "use_index": not exact}
        nearest["nprobes"] = nprobes or self.nprobes
        refine_factor = refine_factor or (None if exact else self.refine_factor)
        if refine_factor is not None:
            nearest["refine_factor"] = refine_factor
        return self._nearest(nearest, where, columns)

    def _lance_float(self, q: np.ndarray, k: int, *, exact: bool, nprobes: int | None,
                     refine_factor: int | None,
                     where: pc.Expression | None) -> tuple[np.ndarray, np.ndarray]:
        hits = self._float_hits(q, k, exact=exact, nprobes=nprobes,
                                refine_factor=refine_factor, where=where)
        distance = hits.column("_distance").to_numpy().astype(np.float32)
        return hits.column("_rowid").to_numpy(), 1.0 - distance

    def _lance_code(self, q: np.ndarray, k: int, *, exact: bool, nprobes: int | None,
                    refine_factor: int | None,
                    where: pc.Expression | None) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best rows of a Lance-indexed code (`pca-rq`) by the stored projection's
        own dot product, `project(q) . project(x)`: Lance's IVF_RQ over the projection
        probes `code_nprobes` of its partitions unless told, its RaBitQ estimate picks
        `refine_factor * k` rows (`CODE_REFINE` unless told) and Lance ranks those by
        their stored projection (an exact scan of the projection below `ann_min_rows` or
        with `exact`)."""
        nearest = {"column": CODE_COLUMN, "q": self.code().query(q), "k": k,
                   "metric": "dot", "use_index": not exact}
        if not exact and self._code_index is not None:
            nearest |= {"nprobes": nprobes or self.code_probes(),
                        "refine_factor": refine_factor or CODE_REFINE}
        hits = self._nearest(nearest, where)
        # Lance's dot distance is 1 - dot
        return (hits.column("_rowid").to_numpy(),
                1.0 - hits.column("_distance").to_numpy().astype(np.float32))

    def code_probes(self) -> int:
        """`code_nprobes` of the code index's partitions, read from the index once per
        searcher (the version is fixed)."""
        if self._code_probes is None:
            stats = self.ds.stats.index_stats(self._code_index)
            self._code_probes = code_nprobes(max(i["num_partitions"]
                                                 for i in stats["indices"]))
        return self._code_probes

    def _bits_stage(self, q: np.ndarray, k: int, *, exact: bool,
                    where: pc.Expression | None) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best rows by the asymmetric sign score, as cosine estimates: a scan of
        the bits, or with a hamming index (and not `exact`) the best of the index's
        `BITS_POOL * k` nearest by hamming."""
        if exact or BITS_COLUMN not in self.indexed:
            row_ids, scores = self._scan(BITS_COLUMN, q, k, where=where)
        else:
            nearest = {"column": BITS_COLUMN, "q": pack_bits(q[None, :])[0],
                       "k": BITS_POOL * k, "metric": "hamming", "use_index": True}
            row_ids = self._nearest(nearest, where).column("_rowid").to_numpy()
            if len(row_ids) == 0:
                return row_ids, np.zeros(0, np.float32)
            bits = self.ds._take_rows(row_ids.tolist(), columns=[BITS_COLUMN])  # stable ids
            scores = lookup_scores(sign_table(q), column_matrix(bits.column(BITS_COLUMN)))
            top = np.argsort(-scores, kind="stable")[:k]
            row_ids, scores = row_ids[top], scores[top]
        return row_ids, sign_cosine(scores, q, self.book.dims)

    def _code_batches(self, column: str, where: pc.Expression | None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A code column as (row ids, code matrix) pieces: the held column when it fits
        `cache_bytes` and no filter applies, else a streamed scan whose memory is one
        batch of `CODE_SCAN_ROWS` rows whatever the table's size."""
        if where is None and column in self._held:
            yield self._held[column]
            return
        if where is None and column == CODE_COLUMN and self._code_keys() is not None:
            yield from self._shared_pieces()
            return
        width = self.ds.schema.field(column).type.list_size
        if where is None and self.ds.count_rows() * width <= self.cache_bytes:
            table = self.ds.to_table(columns=[column], with_row_id=True)
            codes = column_matrix(table.column(column))
            # Column-major bits: each byte's lookup reads one contiguous column, which
            # roughly halved a 1M-row scan here (48-70 ms against 92-252 ms, cores shared).
            self._held[column] = (table.column("_rowid").to_numpy(),
                                  np.asfortranarray(codes)
                                  if column in (BITS_COLUMN, CODE_COLUMN) else codes)
            yield self._held[column]
            return
        for batch in self.ds.to_batches(columns=[column], with_row_id=True,
                                        filter=where, batch_size=CODE_SCAN_ROWS):
            if batch.num_rows:
                yield (batch.column("_rowid").to_numpy(), column_matrix(batch.column(column)))

    def _shared_pieces(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The fitted code column, fragment by fragment, from the process's cache
        (`operators.fragment_codes`): a fragment this version shares with another
        already open (same code file, same deletions) is not loaded again."""
        for key, fragment in self._code_keys() or ():
            def load(fragment=fragment) -> tuple[np.ndarray, np.ndarray]:
                rows = fragment.to_table(columns=[CODE_COLUMN], with_row_id=True)
                return rows.column("_rowid").to_numpy(), column_matrix(rows.column(CODE_COLUMN))

            row_ids, codes = self.shared.get(key, load)
            if len(row_ids):
                yield row_ids, codes

    def _code_keys(self) -> list[tuple[tuple, object]] | None:
        """Each fragment's cache key (table, fragment, the code's data file, its deletion
        file) when the column fits the shared cache, else None (streamed per search)."""
        if self._code_fragments is None:
            if self.ds.count_rows() * (self.code().nbytes + 8) > self.shared.max_bytes:
                self._code_fragments = []
                return None
            field_id = self.ds.lance_schema.field(CODE_COLUMN).id()
            self._code_fragments = [
                ((self.ds.uri, f.fragment_id,
                  next(d.path for d in f.data_files() if field_id in d.fields),
                  f.deletion_file()), f)
                for f in self.ds.get_fragments()]
        return self._code_fragments or None

    def _scan(self, column: str, q: np.ndarray, k: int,
              where: pc.Expression | None) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best rows of a code column (int8 scores, or asymmetric sign scores
        for the bits): a running top-k over the pieces, so a streamed scan holds k
        candidates plus one batch."""
        table = sign_table(q) if column == BITS_COLUMN \
            else self.code().lookup(q) if column == CODE_COLUMN else None
        best_ids, best = np.zeros(0, np.uint64), np.zeros(0, np.float32)
        for row_ids, codes in self._code_batches(column, where):
            piece = lookup_scores(table, codes) if table is not None \
                else self._similarity(q, codes, int8=True)
            ids = np.concatenate([best_ids, row_ids.astype(np.uint64)])
            scores = np.concatenate([best, piece])
            top = np.argpartition(-scores, k - 1)[:k] if len(scores) > k \
                else np.arange(len(scores))
            best_ids, best = ids[top], scores[top]
        return best_ids, best

    def code(self) -> Codec:
        """The table's fitted code, loaded (and checked against the manifest's digest)
        on the first search that uses it.

        Raises:
            QueryError: the table has no fitted code, or it was opened without a way
                to load its codebook.
        """
        if self._code is None:
            if self.manifest.vectors.code is None or self._load_code is None:
                raise QueryError("this table's fitted code cannot be loaded here: open it "
                                 "with its codebook (jobs.api.open_table)")
            self._code = self._load_code()
        return self._code

    def _rescore(self, q: np.ndarray, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score candidates against the float query with the best stored column."""
        if len(row_ids) == 0:
            return row_ids, np.zeros(0, np.float32)
        column = self.rescore_column() or VECTOR_COLUMN
        taken = self.ds._take_rows(row_ids.tolist(), columns=[column])  # stable row ids
        matrix = column_matrix(taken.column(column))
        return row_ids, self._similarity(q, matrix, int8=column == INT8_COLUMN)

    def unit_vectors(self, row_ids: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The rows' chunk ids and vectors as the table's metric compares them (float,
        else decoded int8; unit length for a cosine table), in one read, for re-ranking
        (`operators.qbnorm`).

        Raises:
            QueryError: the table stores neither float nor int8 vectors.
        """
        column = self.rescore_column()
        if column is None:
            raise QueryError("re-ranking needs float or int8 vectors; this table stores "
                             f"{sorted(self.codecs)}")
        taken = self.ds._take_rows(np.asarray(row_ids).tolist(), columns=["id", column])
        matrix = column_matrix(taken.column(column))
        rows = decode_int8(matrix, self.book) if column == INT8_COLUMN \
            else matrix.astype(np.float32)
        if self.manifest.metric == "cosine":
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return taken.column("id").to_pylist(), rows

    def _similarity(self, q: np.ndarray, matrix: np.ndarray, *, int8: bool) -> np.ndarray:
        if self.manifest.metric == "dot":
            if int8:
                return int8_scores(q, matrix, self.book).astype(np.float32)
            return (matrix.astype(np.float32) @ q).astype(np.float32)
        rows = decode_int8(matrix, self.book) if int8 else matrix.astype(np.float32)
        return cosine_rows(q, rows).astype(np.float32)

    def rows(self, row_ids: np.ndarray, scores: np.ndarray,
             columns: Sequence[str] = DEFAULT_COLUMNS) -> pa.Table:
        """The rows behind `candidates`' ids, in that order, with their scores."""
        return take_rows(self.ds, row_ids, scores, columns)


def take_rows(ds: lance.LanceDataset, row_ids: np.ndarray, scores: np.ndarray,
              columns: Sequence[str]) -> pa.Table:
    """Rows by `_rowid`, in the order given, with a `score` column appended."""
    if len(row_ids) == 0:
        empty = ds.schema.empty_table().select(list(columns))
        return empty.append_column("score", pa.array([], pa.float32()))
    # `_take_rows` is marked internal in pylance 14 but is the only way to fetch rows by
    # the `_rowid`s a nearest or full-text search returns; it keeps the order asked for.
    rows = ds._take_rows(np.asarray(row_ids).tolist(), columns=list(columns))
    return rows.append_column("score", pa.array(scores, pa.float32()))


def fold_to_documents(doc_ids: Sequence[str], scores: Sequence[float]) -> list[tuple[str, float]]:
    """Keep each document's best chunk score, best first; equal scores in document id
    order, so a ranking never depends on the order chunks came back in.

    >>> fold_to_documents(["a", "b", "a", "c"], [0.9, 0.8, 0.95, 0.8])
    [('a', 0.95), ('b', 0.8), ('c', 0.8)]
    """
    best: dict[str, float] = {}
    for d, s in zip(doc_ids, scores, strict=True):
        if d not in best or s > best[d]:
            best[d] = s
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))


MAX_CHUNKS_PER_QUERY = 100_000
"""The most chunks `top_documents` fetches for one query."""


def top_documents(fetch: Callable[[int], tuple[Sequence[str], Sequence[float]]], *, k: int,
                  chunks: int) -> list[tuple[str, float]]:
    """The top k documents from chunk hits: `fetch(n)` returns the best n chunks'
    (doc_ids, scores); folding can leave fewer than k documents when documents have many
    chunks, so while it does and the search returned all it was asked for, ask for
    twice as many.

    >>> hits = [("a", 0.9), ("a", 0.8), ("a", 0.7), ("b", 0.6), ("c", 0.5)]
    >>> fetch = lambda n: ([d for d, _ in hits[:n]], [s for _, s in hits[:n]])
    >>> [d for d, _ in top_documents(fetch, k=3, chunks=2)]
    ['a', 'b', 'c']
    """
    while True:
        doc_ids, scores = fetch(chunks)
        folded = fold_to_documents(doc_ids, scores)
        if len(folded) >= k or len(doc_ids) < chunks or chunks >= MAX_CHUNKS_PER_QUERY:
            return folded[:k]
        chunks = min(2 * chunks, MAX_CHUNKS_PER_QUERY)
