"""The query server: `quiver serve --warehouse DIR`, FastAPI on uvicorn.

Endpoints (OpenAPI docs at `/docs`): `GET /tables`, `GET /tables/{name}`,
`POST /tables/{name}/search`, `POST /tables/{name}/search/batch`, `GET /health`, and
`GET /metrics` (Prometheus text: requests, latency by search stage, open versions, model
loads, rejections; `jobs._metrics`), behind the token too unless `metrics_public`.

Safety, by default: binds 127.0.0.1; binding anything else requires a bearer token
(compared in constant time); table names are plain names matched against the
warehouse's own `*.lance` folders, so no path ever comes from a request; bodies, query
texts, batch sizes and k are bounded; filters go through `operators.filters` (typed
`pyarrow.compute` expressions, never pasted text). Open tables are kept in a small LRU
(`OPEN_TABLES`), and the query model is loaded once per weights hash however many tables
or versions use it (`jobs.api.shared_encoder`), so a server that follows months of
reindexes holds one model, not one per version. Opening a table (and loading a model)
happens outside the warehouse's lock: one slow first request does not stall the others.
The warehouse's listing and each table's `current` version are read again at most every
`REFRESH_S` seconds, so a search costs no object-store LIST or manifest read of its own.
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.routing import Match

from jobs._metrics import CONTENT_TYPE, ServerMetrics
from jobs._net import is_loopback
from jobs._query_sample import SAMPLE_LIMIT, QuerySample
from operators.fulltext import RRF_K
from operators.search import MAX_REFINE
from operators.stage_clock import collecting
from schemas.errors import ManifestMismatchError, QueryError, SpecError, TableError

MAX_BODY_BYTES = 1_000_000
BEARER = HTTPBearer(auto_error=False, description="The server's --token (QUIVER_TOKEN).")
"""The bearer scheme, declared so the OpenAPI document (/docs) shows it; checked in
`create_app` (a missing token is a 401 there, not FastAPI's 403)."""
OPEN_TABLES = 8
"""Table versions kept open; the least recently used one is closed past this."""
HTTP_MAX_K = 1000
HTTP_MAX_BATCH = 256
"""An HTTP request's k and batch: tighter than the Python API's (`jobs.api.MAX_K`,
`MAX_BATCH`), since anyone who reaches the port can send them."""
MAX_QUERY_CHARS = 10_000
MAX_TAG_CHARS = 128
"""A version tag's length in a request: anything longer is no tag of ours."""
REFRESH_S = 2.0
"""How long the server trusts its listing of the warehouse and each table's `current`
version: a new table, or a version a reindex or cut-over tags `current`, reaches
searches within this many seconds. A request that names a version (a number or a tag)
opens exactly that one."""
TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class SearchOptions(BaseModel):
    """What every search request may set."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=HTTP_MAX_K)
    mode: Literal["dense", "fts", "hybrid"] = "dense"
    using: Literal["auto", "float", "int8", "binary", "code"] = "auto"
    rescore: int | None = Field(None, ge=1, le=100)
    depth: int | None = Field(None, ge=1, le=10_000)
    refine: int | None = Field(None, ge=1, le=MAX_REFINE, description=(
        "Rows per candidate that a compact index refines: a Lance-indexed code ranks "
        "them by its stored projection (default 4; 8 for steadier quality)."))
    exact: bool = False
    where: dict[str, Any] | None = Field(
        None, description='Structured filter, e.g. {"year": {"gte": 2020}, "lang": "en"}.')
    columns: list[str] = Field(default_factory=list, max_length=64,
                               description="Extra columns to return with each hit.")
    version: int | Annotated[str, Field(max_length=MAX_TAG_CHARS)] | None = Field(
        None, description="Table version number or tag.")
    rrf_k: int = Field(RRF_K, ge=1, le=1000, description="Hybrid search rank-fusion constant.")
    qbnorm: bool = Field(False, description="Re-rank a dense search against the table's "
                         "QB-Norm query bank (`quiver table qbnorm`).")


class SearchRequest(SearchOptions):
    """One query: a text, or a vector for dense search."""

    query: str | None = Field(None, min_length=1, max_length=MAX_QUERY_CHARS)
    vector: list[float] | None = Field(None, max_length=8192)

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.query is None) == (self.vector is None):
            raise ValueError("give exactly one of 'query' and 'vector'")
        return self


class BatchRequest(SearchOptions):
    """Many query texts, embedded in one batch."""

    queries: list[str] = Field(min_length=1, max_length=HTTP_MAX_BATCH)

    @model_validator(mode="after")
    def _bounded(self) -> BatchRequest:
        for i, q in enumerate(self.queries):
            if not q or len(q) > MAX_QUERY_CHARS:
                raise ValueError(f"queries[{i}] must have 1 to {MAX_QUERY_CHARS} characters")
        return self


class Warehouse:
    """The tables under one folder or object-store prefix (`s3://bucket/path`,
    `gs://…`), opened lazily and kept in an LRU of `OPEN_TABLES`; the listing and the
    tables' `current` versions are kept for `refresh_s` seconds of `clock`."""

    def __init__(self, root: str | Path, *, open_tables: int = OPEN_TABLES,
                 storage_options: dict[str, str] | None = None,
                 refresh_s: float = REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import pyarrow.fs as pafs

        from operators.filesystems import resolve

        root = str(root)
        self.storage_options = storage_options or {}
        self._fs, self._prefix = resolve(root, self.storage_options)
        self.root = root.rstrip("/") if "://" in root else str(Path(root).resolve())
        if self._fs.get_file_info(self._prefix).type != pafs.FileType.Directory and \
                "://" not in root:
            raise SpecError(f"--warehouse {root}: not a folder")
        self._tables: OrderedDict[tuple[str, int | str | None], Any] = OrderedDict()
        self._opening: dict[tuple[str, int | str | None], threading.Lock] = {}
        self._lock = threading.Lock()
        self._open_tables = open_tables
        self._refresh_s, self._clock = refresh_s, clock
        self._listed: tuple[float, list[str]] | None = None
        self._current: dict[str, tuple[float, int]] = {}  # one entry per listed table

    def _fresh(self, seen: tuple[float, Any] | None) -> bool:
        return seen is not None and self._clock() - seen[0] < self._refresh_s

    def names(self) -> list[str]:
        """Quiver tables in the warehouse (rejects and exclusion lists left out), as
        listed at most `refresh_s` ago."""
        with self._lock:
            if self._fresh(self._listed):
                return list(self._listed[1])
        now = self._clock()
        names = self._list()
        with self._lock:
            self._listed = (now, names)
            self._current = {n: v for n, v in self._current.items() if n in names}
        return list(names)

    def _list(self) -> list[str]:
        import pyarrow.fs as pafs

        try:
            found = self._fs.get_file_info(pafs.FileSelector(self._prefix, allow_not_found=True))
        except OSError as err:
            raise TableError(f"{self.root}: cannot list the warehouse: {err}") from None
        names = []
        for info in found:
            base = info.base_name
            if info.type == pafs.FileType.Directory and base.endswith(".lance") and \
                    TABLE_NAME.match(base[: -len(".lance")]):
                names.append(base[: -len(".lance")])
        return sorted(names)

    def path(self, name: str) -> str:
        """The URI of a listed table; anything else is a 404, never a path lookup."""
        if not TABLE_NAME.match(name) or name not in self.names():
            raise HTTPException(404, f"no table named {name!r} in this warehouse")
        return f"{self.root}/{name}.lance"

    def table(self, name: str, version: int | str | None = None):
        """The table at `version`; by default the one its `current` tag names now, so a
        reindex or a model cut-over reaches the server without a restart."""
        import lance

        from jobs._tags import current_version
        from jobs.api import open_table

        if version is None:
            with self._lock:
                seen = self._current.get(name)
            if self._fresh(seen):
                version = seen[1]
            else:
                now = self._clock()
                ds = lance.dataset(self.path(name),
                                   storage_options=self.storage_options or None)
                version = current_version(ds) or ds.version
                with self._lock:
                    self._current[name] = (now, version)
        key = (name, version)
        with self._lock:  # held for dict work only, never for I/O or a model load
            if key in self._tables:
                self._tables.move_to_end(key)
                return self._tables[key]
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # concurrent first requests for one version open it once
            with self._lock:
                if key in self._tables:
                    return self._tables[key]
            try:
                table = open_table(self.path(name), version=version,
                                   storage_options=self.storage_options or None)
            except BaseException:
                with self._lock:  # a failed open (no such version) leaves no lock behind
                    self._opening.pop(key, None)
                raise
            with self._lock:
                self._tables[key] = table
                self._opening.pop(key, None)
                while len(self._tables) > self._open_tables:
                    self._tables.popitem(last=False)
            return table

    def open_count(self) -> int:
        """Table versions open now (at most `OPEN_TABLES`)."""
        with self._lock:
            return len(self._tables)


def create_app(warehouse: str | Path, *, token: str | None = None,
               storage_options: dict[str, str] | None = None,
               refresh_s: float = REFRESH_S, metrics: bool = True,
               metrics_public: bool = False, keep_queries: QuerySample | None = None
               ) -> FastAPI:
    """The ASGI app over `warehouse` (a folder or an object-store prefix, reached with
    `storage_options`); `token` (if set) is required on every request, `/metrics`
    included unless `metrics_public`. `metrics=False` leaves the metrics out altogether
    (`benchmarks/query.py` measures what they cost). `keep_queries` samples the query
    texts each table answers (`jobs._query_sample`), written when the server stops too."""
    from jobs.table import model_loads

    store = Warehouse(warehouse, storage_options=storage_options, refresh_s=refresh_s)
    meter = ServerMetrics(open_versions=store.open_count, model_loads=model_loads) \
        if metrics else None
    # FastAPI serves its schema and docs pages outside the routes' auth dependency: with
    # a token the docs pages are off and the schema is a route behind the token.
    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if token else {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if keep_queries is not None:
            keep_queries.flush()

    app = FastAPI(title="Quiver", version="1", lifespan=lifespan,
                  description="Search Quiver tables: dense, full-text and hybrid.", **hidden)

    too_big = {"detail": f"request body over {MAX_BODY_BYTES} bytes"}

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse(too_big, 413)
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            # A chunked body: read it as it streams and stop at the limit, so a client
            # cannot make the server hold more than MAX_BODY_BYTES of it.
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return JSONResponse(too_big, 413)
                chunks.append(chunk)
            request._body = b"".join(chunks)  # what the endpoint's body read returns
        return await call_next(request)

    if meter is not None:
        @app.middleware("http")  # added last, so outermost: it sees 413s and 401s too
        async def count_requests(request: Request, call_next):
            endpoint = next((r.path for r in app.routes
                             if r.matches(request.scope)[0] == Match.FULL), "other")
            start = time.perf_counter()
            response = await call_next(request)
            meter.request(endpoint, getattr(request.state, "mode", "none"),
                          response.status_code, time.perf_counter() - start)
            return response

    def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                          Depends(BEARER)]) -> None:
        if token is None:
            return
        given = f"Bearer {credentials.credentials}" if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    guard = [Depends(authorised)]

    def detail(err: Exception) -> dict:
        """The error for a client: table paths relative to the warehouse, whose own
        location (a folder of this machine, a bucket) is none of the client's business."""
        return {"detail": str(err).replace(f"{store.root}/", "").replace(store.root,
                                                                         "<warehouse>")}

    @app.exception_handler(QueryError)
    async def _query_error(_: Request, err: QueryError) -> JSONResponse:
        return JSONResponse(detail(err), 400)

    @app.exception_handler(ManifestMismatchError)
    async def _mismatch(_: Request, err: ManifestMismatchError) -> JSONResponse:
        return JSONResponse(detail(err), 409)

    @app.exception_handler(TableError)
    async def _table_error(_: Request, err: TableError) -> JSONResponse:
        return JSONResponse(detail(err), 404)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    if token:
        @app.get("/openapi.json", dependencies=guard, include_in_schema=False)
        def openapi() -> dict:
            """The schema, behind the token like every route."""
            return app.openapi()

    @app.get("/tables", dependencies=guard)
    def list_tables() -> dict:
        return {"tables": store.names()}

    @app.get("/tables/{name}", dependencies=guard)
    def table_info(name: str) -> dict:
        from jobs.api import info

        return info(store.path(name), storage_options=store.storage_options or None)

    def _options(req: SearchOptions) -> dict:
        opts = dict(k=req.k, mode=req.mode, using=req.using, rescore=req.rescore,
                    depth=req.depth, exact=req.exact, where=req.where, columns=req.columns,
                    qbnorm=req.qbnorm, refine=req.refine)
        return {**opts, "rrf_k": req.rrf_k} if req.mode == "hybrid" else opts

    @contextmanager
    def timed(name: str, mode: str) -> Iterator[None]:
        """Record the search's stage seconds (a search that raises records none)."""
        with collecting() as seconds:
            yield
        if meter is not None:
            meter.search(name, mode, seconds)

    @app.post("/tables/{name}/search", dependencies=guard)
    def search(name: str, req: SearchRequest, request: Request) -> dict:
        request.state.mode = req.mode  # the request counter's label, refusals included
        table = store.table(name, req.version)
        with timed(name, req.mode):
            if req.vector is not None:
                opts = _options(req)
                if opts.pop("mode") != "dense":
                    raise QueryError("a vector query can only use mode 'dense'")
                hits = table.search_vector(req.vector, **opts)
            else:
                hits = table.search(req.query, **_options(req))
        if keep_queries is not None and req.query is not None:
            keep_queries.add(name, [req.query])
        return {"table": name, "hits": [h.__dict__ for h in hits]}

    @app.post("/tables/{name}/search/batch", dependencies=guard)
    def search_batch(name: str, req: BatchRequest, request: Request) -> dict:
        request.state.mode = req.mode
        table = store.table(name, req.version)
        with timed(name, req.mode):
            results = table.search_batch(req.queries, **_options(req))
        if keep_queries is not None:
            keep_queries.add(name, req.queries)
        return {"table": name, "results": [[h.__dict__ for h in hits] for hits in results]}

    if meter is not None:
        @app.get("/metrics", dependencies=[] if metrics_public else guard,
                 include_in_schema=False)
        def metrics_text() -> Response:
            """Prometheus' text format (jobs._metrics)."""
            return Response(meter.text(), media_type=CONTENT_TYPE)

    return app


def serve(warehouse: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, storage_options: dict[str, str] | None = None,
          refresh_s: float = REFRESH_S, metrics_public: bool = False,
          keep_queries: Path | None = None, keep_queries_limit: int = SAMPLE_LIMIT) -> None:
    """Run the server until interrupted; with `keep_queries`, a sample of each table's
    query texts is kept in that folder (`jobs._query_sample`).

    Raises:
        SpecError: when asked to bind beyond loopback without a token.
    """
    import uvicorn

    if not is_loopback(host) and not token:
        raise SpecError(f"--host {host} exposes the server beyond this machine; set a bearer "
                        "token with --token or QUIVER_TOKEN")
    sample = None if keep_queries is None else QuerySample(keep_queries,
                                                           limit=keep_queries_limit)
    uvicorn.run(create_app(warehouse, token=token, storage_options=storage_options,
                           refresh_s=refresh_s, metrics_public=metrics_public,
                           keep_queries=sample),
                host=host, port=port, log_level="info")
