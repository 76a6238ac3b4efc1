"""The web layer of ``idml serve``: a FastAPI app over a :class:`SearchService`.

Routes: ``GET /`` (the search page, self-contained: no request leaves the server),
``POST /search``, ``GET /items``, ``GET /items/{id}``, ``GET /items/{id}/thumbnail``,
``GET /health``, ``GET /info`` and FastAPI's schema at ``/openapi.json``. Request bodies are
capped before they are parsed (:class:`BodyLimit`); model forwards run in a bounded thread
pool, searches in the framework's thread pool, both under a per-request timeout and a cap on
searches in flight (503 beyond it). The app runs on uvicorn (:func:`run`).
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures at run time,
# and their bounds (``le=lim.max_k``) come from create_app's locals.
import asyncio
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from idml import __version__
from idml.serving.service import RequestError, SearchService, decode_image

#: The page may load from its own server only (and show uploads through blob: URLs).
PAGE_POLICY = ("default-src 'none'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
               "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
               "form-action 'self'")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) reaches only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """ASGI middleware: answer 413 to a request body over ``limit`` bytes, by its
    Content-Length before reading, or while reading a body sent without one (the body is
    buffered, at most ``limit`` bytes, and replayed to the app)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if sent:  # the body went to the app; what comes next is the disconnect
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Callable) -> None:
        detail = {"detail": f"request body over {self.limit} bytes; this server takes at most "
                            f"{self.limit} (idml serve --max-upload-mb)"}
        data = json.dumps(detail).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})


class Problem(BaseModel):
    """A refused request: what is wrong, in words (422s use FastAPI's validation shape)."""

    detail: str


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the refusals a route can answer with."""
    words = {400: "empty upload", 404: "unknown item", 413: "body or image too large",
             415: "not a readable image", 503: "busy or timed out"}
    return {status: {"model": Problem, "description": words[status]} for status in statuses}


def _refusal(exc: RequestError) -> JSONResponse:
    """``exc`` as a response; a 422 in FastAPI's validation shape, naming the field."""
    if exc.status != 422:
        retry = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=retry)
    loc = ["body"] if exc.field is None else ["body", exc.field]
    return JSONResponse({"detail": [{"type": "value_error", "loc": loc, "msg": str(exc)}]},
                        status_code=422)


def _page() -> str:
    return resources.files("idml.serving").joinpath("static/search.html").read_text("utf-8")


class _Runner:
    """Runs a request's work under the service's limits: searches in flight, timeout."""

    def __init__(self, service: SearchService) -> None:
        lim = service.limits
        self.forwards = ThreadPoolExecutor(max_workers=lim.forward_workers,
                                           thread_name_prefix="idml-forward")
        self.slots = asyncio.Semaphore(lim.max_pending)
        self.timeout = lim.timeout_s

    async def __call__(self, work: Callable[[], Awaitable[Any]]) -> Any:
        if self.slots.locked():
            raise RequestError(503, "the server is busy (too many searches in flight); retry")
        async with self.slots:
            try:
                return await asyncio.wait_for(work(), self.timeout)
            except asyncio.TimeoutError:
                raise RequestError(503, f"the search took longer than {self.timeout} s "
                                        "(idml serve --timeout)") from None

    async def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.forwards.submit(fn, *args))


def create_app(service: SearchService) -> Any:
    """The ASGI app serving ``service`` (FastAPI, wrapped in :class:`BodyLimit`)."""
    runner, page = _Runner(service), _page()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        runner.forwards.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="idml serve", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  description="Image retrieval with an introspective model: hits with their "
                              "cosine and introspective similarity, and the query's confidence.")

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return _refusal(exc)

    _add_item_routes(app, service, page)
    _add_search_route(app, service, runner)
    return BodyLimit(app, service.limits.max_upload_bytes)


def _add_item_routes(app: FastAPI, service: SearchService, page: str) -> None:
    """The page, ``/health``, ``/info`` and the ``/items`` routes."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model and index are loaded."""
        return {"status": "ok", "items": len(service.index)}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """The model fingerprint, the index (kind, size) and the confidence rule."""
        return service.info()

    @app.get("/items")
    async def items(start: Annotated[int, Query(ge=0)] = 0,
                    count: Annotated[int, Query(ge=1, le=200)] = 24) -> dict[str, Any]:
        """Indexed items ``start`` to ``start + count - 1``."""
        return service.items(start, count)

    @app.get("/items/{item}", responses=_documented(404))
    async def item(item: int) -> dict[str, Any]:
        """An indexed item: label, confidence and its thumbnail's URL."""
        return service.item(item)

    @app.get("/items/{item}/thumbnail", response_class=Response,
             responses={**_documented(404),
                        200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    async def thumbnail(item: int) -> Response:
        """The item's thumbnail (PNG or JPEG), made when the index was built."""
        data, mime = await run_in_threadpool(service.thumbnail, item)  # may decode a file
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})


def _add_search_route(app: FastAPI, service: SearchService, runner: _Runner) -> None:
    """``POST /search``: decoding, the forward and the search under ``runner``'s limits."""
    lim = service.limits

    @app.post("/search", responses=_documented(400, 404, 413, 415, 503))
    async def search(
        file: Annotated[UploadFile | None, File(description="query image")] = None,
        item_id: Annotated[int | None, Form(alias="id",
                                            description="or: an indexed item as the query")] = None,
        k: Annotated[int, Form(ge=1, le=lim.max_k)] = 10,
        rerank: Annotated[Literal["none", "introspective"], Form()] = "none",
        shortlist: Annotated[int, Form(ge=1, le=lim.max_shortlist,
                                       description="candidates re-ranked")] = 100,
        nprobe: Annotated[int | None, Form(ge=1, description="ivf indexes: cells visited "
                                                             "(at most nlist)")] = None,
        ef_search: Annotated[int | None, Form(ge=1, le=lim.max_ef_search,
                                              description="hnsw indexes: beam width")] = None,
    ) -> dict[str, Any]:
        """The ``k`` nearest indexed items of an uploaded image (field ``file``) or of an
        indexed item (``id``, left out of its own results), with the query's confidence."""
        if (file is None) == (item_id is None):
            raise RequestError(422, "give either an image in field 'file' or an item 'id'")
        params = {"k": k, "rerank": rerank, "shortlist": shortlist, "nprobe": nprobe,
                  "ef_search": ef_search}
        data = b"" if file is None else await file.read()
        started = time.perf_counter()

        async def work() -> dict[str, Any]:
            if item_id is not None:
                return await run_in_threadpool(service.search_item, item_id, **params)
            image = await run_in_threadpool(decode_image, data, service.limits.max_pixels)
            semantic, uncertainty = await runner.forward(service.embed, image)
            found = await run_in_threadpool(service.search, semantic, uncertainty, **params)
            return {"query": {"upload": file.filename if file else None}, **found}

        result = await runner(work)
        return {**result, "took_ms": 1000.0 * (time.perf_counter() - started)}


def run(service: SearchService, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info") -> None:
    """Serve ``service`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level,
                timeout_keep_alive=5, limit_concurrency=4 * service.limits.max_pending)
