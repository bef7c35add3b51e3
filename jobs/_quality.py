"""The quality report: every way a table can be searched, scored on real judgments.

For each way (float exact, float ANN, int8 alone and rescored, binary alone and
rescored, the table's fitted code alone and rescored at depths `CODE_DEPTHS`, float
exact re-ranked by QB-Norm when the table has a query bank, Matryoshka truncations of the
float column) it measures first-stage bytes per
vector, nDCG@10, recall@100, the share of float nDCG@10 kept, and per-query search
latency (p50/p99, query embedding excluded). Float ANN uses the table's own index when it
has one, else an index built with the job's defaults on a temporary copy of the vectors,
so small tables report ANN quality too.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import lance
import numpy as np

from operators.evaluate import BeirQueries, score_runs
from operators.index import build_vector_index
from operators.quantize import bytes_per_vector, column_matrix, truncate_query
from operators.search import DEFAULT_RESCORE, VectorSearcher, take_rows, top_documents
from schemas.records import VECTOR_COLUMN
from schemas.spec import IndexSpec

ChunkSearch = Callable[[np.ndarray, int], tuple[list[str], list[str], list[float]]]
"""(query vector, chunks wanted) -> (chunk ids, doc ids, scores) of the top chunks."""

CODE_DEPTHS = (40, 100, 200)
"""Rescoring depths the report measures a fitted code at: candidates re-scored."""


@dataclass(frozen=True)
class WayResult:
    """One row of the report."""

    way: str
    bytes_per_vector: float
    ndcg_at_10: float
    recall_at_100: float
    retained: float | None
    """nDCG@10 as a share of the float exact nDCG@10 (None without a float column)."""
    p50_ms: float
    p99_ms: float
    note: str = ""


def _measure(name: str, nbytes: float, search: ChunkSearch, vectors: np.ndarray,
             queries: BeirQueries, chunks: int, note: str = "") -> WayResult:
    runs: dict[str, list[str]] = {}
    latencies = []
    for qid, v in zip(queries.ids, vectors, strict=True):
        started = time.perf_counter()
        ranked = top_documents(lambda n, v=v: search(v, n)[1:], k=100, chunks=chunks)
        latencies.append(1000 * (time.perf_counter() - started))
        runs[qid] = [d for d, _ in ranked]
    metrics = score_runs(runs, queries.qrels)
    return WayResult(name, nbytes, round(metrics["ndcg@10"], 4), round(metrics["recall@100"], 4),
                     None, round(float(np.percentile(latencies, 50)), 2),
                     round(float(np.percentile(latencies, 99)), 2), note)


def _lance_way(searcher: VectorSearcher, **options) -> ChunkSearch:
    def run(v: np.ndarray, k: int) -> tuple[list[str], list[str], list[float]]:
        hits = searcher.search(v, k=k, columns=("id", "doc_id"), **options)
        return (hits.column("id").to_pylist(), hits.column("doc_id").to_pylist(),
                hits.column("score").to_pylist())

    return run


def _qbnorm_way(rerank: Callable[..., tuple[np.ndarray, np.ndarray]],
                searcher: VectorSearcher) -> ChunkSearch:
    """Float exact search re-ranked by QB-Norm (`jobs.table.Table.qbnorm_candidates`)."""
    def run(v: np.ndarray, k: int) -> tuple[list[str], list[str], list[float]]:
        row_ids, scores = rerank(v, k, using="float", exact=True)
        hits = take_rows(searcher.ds, row_ids, scores, ("id", "doc_id"))
        return (hits.column("id").to_pylist(), hits.column("doc_id").to_pylist(),
                hits.column("score").to_pylist())

    return run


def _depth_way(searcher: VectorSearcher, depth: int) -> ChunkSearch:
    """The fitted code's best `depth` chunks, re-scored with the float vectors: only
    those chunks can be hits (the rescoring depth of the compression ladder)."""
    def run(v: np.ndarray, k: int) -> tuple[list[str], list[str], list[float]]:
        hits = searcher.search(v, k=min(k, depth), columns=("id", "doc_id"), using="code",
                               depth=depth)
        return (hits.column("id").to_pylist(), hits.column("doc_id").to_pylist(),
                hits.column("score").to_pylist())

    return run


def _matryoshka_way(matrix: np.ndarray, ids: np.ndarray, doc_ids: np.ndarray, dims: int,
                    renormalize: bool) -> ChunkSearch:
    rows = matrix[:, :dims]
    if renormalize:
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    def run(v: np.ndarray, k: int) -> tuple[list[str], list[str], list[float]]:
        scores = rows @ truncate_query(v, dims, renormalize=renormalize)
        top = np.argsort(-scores, kind="stable")[:k]
        return ids[top].tolist(), doc_ids[top].tolist(), scores[top].tolist()

    return run


def _ann_searcher(searcher: VectorSearcher, workdir: str) -> tuple[VectorSearcher, str]:
    """The table's own ANN index, or one built with job defaults on a temporary copy."""
    ds = searcher.ds
    if any(VECTOR_COLUMN in i["fields"] for i in ds.list_indices()):
        return searcher, "table's own index"
    copy = ds.to_table(columns=["id", "doc_id", VECTOR_COLUMN])
    copy = copy.replace_schema_metadata(ds.schema.metadata)
    tmp = lance.write_dataset(copy, f"{workdir}/ann.lance")
    desc = build_vector_index(tmp, IndexSpec(), metric=searcher.manifest.metric,
                              dims=searcher.book.dims)
    return VectorSearcher(lance.dataset(f"{workdir}/ann.lance"), searcher.manifest), \
        f"{desc}, built on a temporary copy"


def ann_recall(exact: ChunkSearch, ann: ChunkSearch, vectors: np.ndarray, k: int = 10) -> float:
    """Mean overlap of ANN and exact top-k chunk lists (recall@k against exact search)."""
    shares = []
    for v in vectors:
        truth = set(exact(v, k)[0])
        shares.append(len(truth & set(ann(v, k)[0])) / max(1, len(truth)))
    return float(np.mean(shares))


def quality_report(searcher: VectorSearcher, vectors: np.ndarray, queries: BeirQueries, *,
                   chunks_per_query: int = 300,
                   matryoshka: tuple[int, ...] | None = None,
                   qbnorm: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Score every way `searcher`'s table can be searched; see the module docstring.

    Args:
        searcher: The table.
        vectors: Query vectors (model dims), in `queries.ids` order.
        queries: The judged queries.
        chunks_per_query: Chunks fetched per query before folding to documents.
        matryoshka: Truncation sizes to try on the float column; None means dims/2 and
            dims/4 when the table stores untruncated float vectors.
        qbnorm: The table's QB-Norm re-ranking (`Table.qbnorm_candidates`) when it has
            a query bank: measured as float exact + QB-Norm, so the report says whether
            it helps.
    """
    book = searcher.book
    rows: list[WayResult] = []
    extra: dict = {}

    def add(name: str, nbytes: float, search: ChunkSearch, note: str = "") -> None:
        rows.append(_measure(name, nbytes, search, vectors, queries, chunks_per_query, note))

    codecs = searcher.codecs
    float_codec = next((c for c in ("float32", "float16") if c in codecs), None)
    with tempfile.TemporaryDirectory(prefix="quiver-eval-") as workdir:
        if float_codec:
            fbytes = bytes_per_vector(float_codec, book.dims)
            exact = _lance_way(searcher, using="float", exact=True)
            add(f"{float_codec} exact", fbytes, exact)
            ann_s, note = _ann_searcher(searcher, workdir)
            ann = _lance_way(ann_s, using="float")
            extra["ann_recall@10"] = round(ann_recall(exact, ann, vectors), 4)
            add(f"{float_codec} ANN", fbytes, ann,
                f"{note}; recall@10 vs exact {extra['ann_recall@10']}")
            if qbnorm is not None:
                add(f"{float_codec} exact + QB-Norm", fbytes, _qbnorm_way(qbnorm, searcher),
                    "the table's query bank (quiver table qbnorm), dynamic inverted softmax")
        if "int8" in codecs:
            ibytes = bytes_per_vector("int8", book.dims)
            add("int8 alone", ibytes, _lance_way(searcher, using="int8", rescore=1))
            if float_codec:
                add("int8 + rescore", ibytes, _lance_way(searcher, using="int8"),
                    f"{float_codec} rescoring of {DEFAULT_RESCORE}x candidates")
        if "binary" in codecs:
            bbytes = bytes_per_vector("binary", book.dims)
            add("binary alone", bbytes, _lance_way(searcher, using="binary", rescore=1))
            best = searcher.rescore_column()
            if best:
                add("binary + rescore", bbytes, _lance_way(searcher, using="binary"),
                    f"{'float' if searcher.has_float else 'int8'} rescoring of "
                    f"{DEFAULT_RESCORE}x candidates")
        code = searcher.manifest.vectors.code
        if code is not None:
            name = f"code {code.name}"
            add(f"{name} alone", code.nbytes, _lance_way(searcher, using="code", rescore=1))
            if float_codec:
                for depth in CODE_DEPTHS:
                    add(f"{name} + rescore@{depth}", code.nbytes,
                        _depth_way(searcher, depth),
                        f"{float_codec} rescoring of the code's best {depth} chunks")
        if float_codec and not searcher.manifest.vectors.truncated:
            table = searcher.ds.to_table(columns=["id", "doc_id", VECTOR_COLUMN])
            matrix = column_matrix(table.column(VECTOR_COLUMN)).astype(np.float32)
            ids = np.asarray(table.column("id").to_pylist(), dtype=object)
            doc_ids = np.asarray(table.column("doc_id").to_pylist(), dtype=object)
            sizes = matryoshka or (book.dims // 2, book.dims // 4)
            for dims in sizes:
                add(f"matryoshka {dims} exact", bytes_per_vector(float_codec, dims),
                    _matryoshka_way(matrix, ids, doc_ids, dims,
                                    searcher.manifest.model.normalize),
                    "numpy scan of the truncated float column")
    base = rows[0].ndcg_at_10 if float_codec else None
    rows = [WayResult(**{**asdict(r), "retained": round(r.ndcg_at_10 / base, 4) if base else None})
            for r in rows]
    return {"queries": len(queries.ids), "chunks_per_query": chunks_per_query,
            "ways": [asdict(r) for r in rows], **extra}


def format_report(report: dict) -> str:
    """The report as a fixed-width text table."""
    width = max([22, *(len(r["way"]) + 1 for r in report["ways"])])
    head = (f"{'way':<{width}}{'bytes/vec':>10}{'nDCG@10':>9}{'R@100':>8}{'kept':>8}"
            f"{'p50 ms':>9}{'p99 ms':>9}  note")
    lines = [head, "-" * len(head)]
    for r in report["ways"]:
        kept = f"{100 * r['retained']:.1f}%" if r["retained"] is not None else "-"
        lines.append(f"{r['way']:<{width}}{r['bytes_per_vector']:>10g}{r['ndcg_at_10']:>9.4f}"
                     f"{r['recall_at_100']:>8.4f}{kept:>8}{r['p50_ms']:>9.2f}"
                     f"{r['p99_ms']:>9.2f}  {r['note']}")
    return "\n".join(lines)


def report_html(report: dict, *, title: str) -> str:
    """A standalone HTML page: the table and a plot of nDCG@10 against bytes per vector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["ways"]:
        ax.scatter(r["bytes_per_vector"], r["ndcg_at_10"])
        ax.annotate(r["way"], (r["bytes_per_vector"], r["ndcg_at_10"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("first-stage bytes per vector (log scale)")
    ax.set_ylabel("nDCG@10")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    image = base64.b64encode(buf.getvalue()).decode()
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>"
        for r in report["ways"]
    )
    header = "".join(f"<th>{html.escape(k)}</th>" for k in report["ways"][0]) \
        if report["ways"] else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
            "border-bottom:1px solid #ddd}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{report['queries']} queries, "
            f"{report['chunks_per_query']} chunks per query folded to documents.</p>"
            f"<img src='data:image/png;base64,{image}' alt='nDCG@10 against bytes per vector'>"
            f"<table><tr>{header}</tr>{cells}</table></body></html>")
