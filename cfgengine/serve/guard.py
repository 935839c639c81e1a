"""What stands between `cfgengine serve` and its clients, as plain ASGI layers around the app and
one uvicorn protocol: every answer counted by status, an optional API key, a request body limit,
a one-line JSON 500 for an unexpected error, and a time limit on slow clients.

The layers run outermost first: Answers (count, 500) → ApiKey (401) → BodyLimit (413) → the app,
so a refused key never reads the body and every refusal is counted.
"""
from __future__ import annotations

import hmac
import json
import logging
import time

logger = logging.getLogger("cfgengine.serve")

MONITORING = ("/healthz", "/metrics")  # not counted: probes would drown the clients' requests
OPEN_PATHS = ("/healthz",)  # answered without the API key (load balancers' health probes)


async def reply(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """A whole {"error": message} JSON answer."""
    body = json.dumps({"error": message}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


class Answers:
    """Counts every answer (except to the monitoring endpoints) by status in `metrics`, with
    the latency of POST /v1/samples; an exception escaping the app before it answered becomes a
    one-line JSON 500 (logged with its traceback), so the client's connection stays usable."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        except Exception as err:
            if status is not None:  # half an answer is out: only dropping the connection is left
                raise
            logger.exception("cfgengine serve: %s %s failed", scope["method"], scope["path"])
            await reply(sending, 500, f"internal error: {type(err).__name__}")
        finally:
            if status is not None and scope["path"] not in MONITORING:
                samples = scope["path"] == "/v1/samples"
                self.metrics.count(status, time.monotonic() - start if samples else None)


class ApiKey:
    """401 unless the request carries `key` (`Authorization: Bearer KEY` or `X-API-Key: KEY`),
    compared in constant time; OPEN_PATHS need none."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.allowed(scope):
            return await self.app(scope, receive, send)
        await reply(send, 401, "this server needs an API key: send 'Authorization: Bearer KEY'",
                    {"WWW-Authenticate": "Bearer"})

    def allowed(self, scope) -> bool:
        given = header(scope, b"x-api-key")
        bearer = header(scope, b"authorization") or b""
        if given is None and bearer[:7].lower() == b"bearer ":
            given = bearer[7:].strip()
        return given is not None and hmac.compare_digest(given, self.key)


class BodyLimit:
    """413 for a body over `max_bytes`: at once from its Content-Length (nothing read), else
    (chunked) as soon as the bytes read pass it. The body is read here, bounded, and replayed to
    the app; later `receive` calls (the disconnect polls) go to the server."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is not None and (len(length) > 18 or int(length) > self.max_bytes):
            return await self.too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody left to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.too_large(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay, send)

    async def too_large(self, send) -> None:
        await reply(send, 413, f"the request body is over the server's --max-body-bytes "
                               f"({self.max_bytes} bytes)", {"Connection": "close"})


def guarded_protocol(client_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose client has not sent a whole request
    (head and body) within `client_timeout_s` of connecting or of its previous answer: uvicorn
    alone never times out a client that trickles bytes (slowloris)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _guard = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._guard is not None:
                self._guard.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._guard is not None:
                self._guard.cancel()
            self._guard = self.loop.call_later(client_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and \
                    not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def server_config(app, *, client_timeout_s: float = 30.0):
    """The uvicorn config `cfgengine serve` runs `app` with (tests use the same)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", http=guarded_protocol(client_timeout_s),
                          timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024)
