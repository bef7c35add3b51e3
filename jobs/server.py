"""The query server: `quiver serve --warehouse DIR`, FastAPI on uvicorn.

Endpoints (OpenAPI docs at `/docs`): `GET /tables`, `GET /tables/{name}`,
`POST /tables/{name}/search`, `POST /tables/{name}/search/batch`, `GET /health`.

Safety, by default: binds 127.0.0.1; binding anything else requires a bearer token
(compared in constant time); table names are plain names matched against the
warehouse's own `*.lance` folders, so no path ever comes from a request; bodies, query
texts, batch sizes and k are bounded; filters go through `operators.filters` (typed
`pyarrow.compute` expressions, never pasted text). Each table's model is loaded once and
reused across requests.
"""

from __future__ import annotations

import hmac
import re
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs._net import is_loopback
from operators.fulltext import RRF_K
from schemas.errors import ManifestMismatchError, QueryError, SpecError, TableError

MAX_BODY_BYTES = 1_000_000
MAX_K = 1000
MAX_BATCH = 256
MAX_QUERY_CHARS = 10_000
TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class SearchOptions(BaseModel):
    """What every search request may set."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=MAX_K)
    mode: Literal["dense", "fts", "hybrid"] = "dense"
    using: Literal["auto", "float", "int8", "binary"] = "auto"
    rescore: int | None = Field(None, ge=1, le=100)
    exact: bool = False
    where: dict[str, Any] | None = Field(
        None, description='Structured filter, e.g. {"year": {"gte": 2020}, "lang": "en"}.')
    columns: list[str] = Field(default_factory=list, max_length=64,
                               description="Extra columns to return with each hit.")
    version: int | str | None = Field(None, description="Table version number or tag.")
    rrf_k: int = Field(RRF_K, ge=1, le=1000, description="Hybrid search rank-fusion constant.")


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

    queries: list[str] = Field(min_length=1, max_length=MAX_BATCH)

    @model_validator(mode="after")
    def _bounded(self) -> BatchRequest:
        for i, q in enumerate(self.queries):
            if not q or len(q) > MAX_QUERY_CHARS:
                raise ValueError(f"queries[{i}] must have 1 to {MAX_QUERY_CHARS} characters")
        return self


class Warehouse:
    """The tables under one folder, opened lazily and kept (model loaded once per table)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise SpecError(f"--warehouse {root}: not a folder")
        self._tables: dict[tuple[str, int | str | None], Any] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Quiver tables in the folder (rejects datasets left out)."""
        return sorted(p.name[: -len(".lance")] for p in self.root.glob("*.lance")
                      if p.is_dir() and not p.name.endswith(".rejects.lance")
                      and TABLE_NAME.match(p.name[: -len(".lance")]))

    def path(self, name: str) -> Path:
        """The folder of a listed table; anything else is a 404, never a path lookup."""
        if not TABLE_NAME.match(name) or name not in self.names():
            raise HTTPException(404, f"no table named {name!r} in this warehouse")
        return self.root / f"{name}.lance"

    def table(self, name: str, version: int | str | None = None):
        """The table at `version`; by default the one its `current` tag names now, so a
        reindex or a model cut-over reaches the server without a restart."""
        import lance

        from jobs._cutover import current_version
        from jobs.api import open_table

        if version is None:
            ds = lance.dataset(str(self.path(name)))
            version = current_version(ds) or ds.version
        key = (name, version)
        with self._lock:
            if key not in self._tables:
                self._tables[key] = open_table(self.path(name), version=version)
            return self._tables[key]


def create_app(warehouse: Path, *, token: str | None = None) -> FastAPI:
    """The ASGI app over `warehouse`; `token` (if set) is required on every request."""
    store = Warehouse(warehouse)
    app = FastAPI(title="Quiver", version="1",
                  description="Search Quiver tables: dense, full-text and hybrid.")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, 413)
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"},
                                    413)
        return await call_next(request)

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    guard = [Depends(authorised)]

    @app.exception_handler(QueryError)
    async def _query_error(_: Request, err: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, 400)

    @app.exception_handler(ManifestMismatchError)
    async def _mismatch(_: Request, err: ManifestMismatchError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, 409)

    @app.exception_handler(TableError)
    async def _table_error(_: Request, err: TableError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, 404)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/tables", dependencies=guard)
    def list_tables() -> dict:
        return {"tables": store.names()}

    @app.get("/tables/{name}", dependencies=guard)
    def table_info(name: str) -> dict:
        from jobs.api import info

        return info(store.path(name))

    def _options(req: SearchOptions) -> dict:
        opts = dict(k=req.k, mode=req.mode, using=req.using, rescore=req.rescore,
                    exact=req.exact, where=req.where, columns=req.columns)
        return {**opts, "rrf_k": req.rrf_k} if req.mode == "hybrid" else opts

    @app.post("/tables/{name}/search", dependencies=guard)
    def search(name: str, req: SearchRequest) -> dict:
        table = store.table(name, req.version)
        if req.vector is not None:
            opts = _options(req)
            if opts.pop("mode") != "dense":
                raise QueryError("a vector query can only use mode 'dense'")
            hits = table.search_vector(req.vector, **opts)
        else:
            hits = table.search(req.query, **_options(req))
        return {"table": name, "hits": [h.__dict__ for h in hits]}

    @app.post("/tables/{name}/search/batch", dependencies=guard)
    def search_batch(name: str, req: BatchRequest) -> dict:
        table = store.table(name, req.version)
        results = table.search_batch(req.queries, **_options(req))
        return {"table": name, "results": [[h.__dict__ for h in hits] for hits in results]}

    return app


def serve(warehouse: Path, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None) -> None:
    """Run the server until interrupted.

    Raises:
        SpecError: when asked to bind beyond loopback without a token.
    """
    import uvicorn

    if not is_loopback(host) and not token:
        raise SpecError(f"--host {host} exposes the server beyond this machine; set a bearer "
                        "token with --token or QUIVER_TOKEN")
    uvicorn.run(create_app(warehouse, token=token), host=host, port=port, log_level="info")
