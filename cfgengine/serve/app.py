"""The HTTP side of `cfgengine serve` (FastAPI): `POST /v1/samples`, `GET /healthz`,
`GET /metrics`, the OpenAPI schema at `/openapi.json` and a self-contained page of it at `/docs`
(FastAPI's own pages load their assets from a CDN, blank offline). Handlers are async and never
touch torch: they validate, enqueue a Job for the scheduler's worker thread and await its answer,
cancelling the job when the client goes away."""
from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from cfgengine.registry import load
from cfgengine.serve.batch import Engine
from cfgengine.serve.encode import MEDIA_TYPES, encode, png_problem
from cfgengine.serve.guard import Answers, ApiKey, BodyLimit, server_config
from cfgengine.serve.metrics import Metrics
from cfgengine.serve.schema import Limits, RequestError, SampleRequest, check_request
from cfgengine.serve.scheduler import Scheduler

DISCONNECT_POLL_S = 0.1


class Service:
    """The model, its engine and scheduler, built on first use (so a Ray Serve replica loads the
    model in its own process, and an ASGI test client without lifespan events still works)."""

    def __init__(self, model, *, device=None, backend=None, max_rows=64, max_queue=256,
                 max_steps=1000, deadline_s=600.0):
        self._model, self._device, self._backend = model, device, backend
        self.settings = dict(max_rows=max_rows, max_queue=max_queue)
        self._bounds = dict(max_steps=max_steps, deadline_s=deadline_s)
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None

    def ready(self) -> Scheduler:
        if self.scheduler is None:
            model = load(self._model) if isinstance(self._model, str) else self._model
            engine = Engine(model, device=self._device, backend=self._backend)
            self.limits = Limits(engine.num_classes, self.settings["max_rows"], **self._bounds,
                                 guidance_embedded=engine.info.guidance_embedded,
                                 conditioning=engine.info.conditioning)
            self.scheduler = Scheduler(engine, metrics=self.metrics, **self.settings)
            self.scheduler.start()
        return self.scheduler

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.drain()
            self.scheduler.wait_idle(timeout=600)
            self.scheduler.stop()


def create_app(model="default", *, api_key: str | None = None, max_body_bytes: int = 2**20,
               **settings) -> FastAPI:
    """The app serving `model` (a name/file for `cfgengine.load`, or a loaded model); `api_key`:
    required on every path but /healthz (None: open); bodies over `max_body_bytes` get 413;
    `settings` are Service's (device, backend, max_rows, max_queue, max_steps, deadline_s)."""
    service = Service(model, **settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.ready()
        yield
        await asyncio.to_thread(service.shutdown)

    app = FastAPI(title="cfgengine", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Class-conditional diffusion samples with classifier-free guidance "
                              "(Ho & Salimans 2022); requests share every network call.")
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)  # the last added runs first
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(Answers, metrics=service.metrics)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/samples", response_class=Response,
              responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}})
    async def samples(body: SampleRequest, request: Request):
        """Samples for `labels` (or `prompt`, with `negative_prompt`, for a prompt model): npy
        float32 [N, *S] equal to `cfgengine.sample` offline."""
        scheduler = service.ready()
        job = check_request(body, service.limits)
        if job.format == "png" and png_problem(scheduler.engine.sample_shape):
            raise RequestError(422, png_problem(scheduler.engine.sample_shape))
        outcome = await _run(scheduler, job, request)
        if isinstance(outcome, RequestError):
            raise outcome
        return Response(encode(outcome, job.labels, job.w, job.format),
                        media_type=MEDIA_TYPES[job.format])

    @app.get("/healthz")
    async def healthz():
        """200 while serving, 503 while draining after SIGTERM."""
        scheduler = service.ready()
        engine = scheduler.engine
        body = {"status": "draining" if scheduler.draining else "ok",
                "num_classes": engine.num_classes, "conditioning": engine.info.conditioning,
                "sample_shape": list(engine.sample_shape),
                "device": str(engine.device), "backend": engine.backend, **service.settings}
        return JSONResponse(body, status_code=503 if scheduler.draining else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text: queue depth, rows in flight, requests, latency histogram."""
        return PlainTextResponse(service.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(_docs_page(app.openapi()))


def _docs_page(schema: dict) -> str:
    """The API's endpoints and their summaries as one HTML page with no outside assets."""
    from html import escape

    items = [f"<li><code>{method.upper()} {escape(path)}</code> — "
             f"{escape(op.get('description') or op.get('summary', ''))}</li>"
             for path, ops in schema["paths"].items() for method, op in ops.items()]
    return (f"<!doctype html><title>{escape(schema['info']['title'])}</title>"
            f"<h1>{escape(schema['info']['title'])}</h1>"
            f"<p>{escape(schema['info'].get('description', ''))}</p><ul>{''.join(items)}</ul>"
            '<p>The full schema: <a href="/openapi.json">/openapi.json</a></p>')


async def _run(scheduler: Scheduler, job, request: Request):
    """Enqueue `job` and await its outcome; cancel it if the client disconnects first."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    job.on_done = lambda outcome: loop.call_soon_threadsafe(_settle, future, outcome)
    scheduler.submit(job)
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
        if done:
            return future.result()
        if await request.is_disconnected():
            scheduler.cancel(job)
            return RequestError(499, "the client went away")


def _settle(future: asyncio.Future, outcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is {"error": "one line"} with a 4xx/5xx status; the server keeps serving."""
    @app.exception_handler(RequestError)
    async def request_error(request, err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
        return JSONResponse({"error": _one_line(first)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)


def _one_line(error: dict) -> str:
    """'field: message' from a pydantic error, without pydantic's internal location parts."""
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body" and "[" not in str(p))
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where and not message.startswith(where) else message


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **config):
    """uvicorn serving `app` in a background thread on host:port (0 = a free port) until the
    block ends, with `cfgengine serve`'s config (`config`: server_config's); yields the base URL.
    For tests and the load generator."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    sock.listen(128)
    server = uvicorn.Server(server_config(app, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        if not server.started:
            raise RuntimeError(f"the server on {host}:{port} did not start")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
