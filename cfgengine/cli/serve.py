"""`cfgengine serve`: the HTTP sampling service (FastAPI on uvicorn; the `[serve]` extra).

SIGTERM (or Ctrl-C) drains: new requests get 503, queued and running ones finish and are sent,
then the process exits 0. A second signal exits at once."""
from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from pathlib import Path

from cfgengine.cli.args import UserError, add_model_flag
from cfgengine.backends import BACKENDS


def add(sub) -> None:
    p = sub.add_parser("serve", help="HTTP sampling service: POST /v1/samples, /healthz, /metrics",
                       description="Serve a model over HTTP. Requests with different classes, w, "
                                   "steps, samplers and seeds share one running batch, joining "
                                   "and leaving at step boundaries. Needs the [serve] extra; "
                                   "see docs/serving.md.")
    add_model_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free)")
    p.add_argument("--max-rows", type=int, default=64,
                   help="rows in the running batch; guided rows count twice (default: 64)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting to join; beyond it 429 (default: 256)")
    p.add_argument("--max-steps", type=int, default=1000, help="largest steps a request may ask")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds a request may take, queue included (default: 600)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: the model's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default) picks as `cfgengine sample` does: onnxruntime on CPU "
                        "where it is installed, else torch; cudagraph's fixed batch does not "
                        "serve, so it becomes torch. /healthz names the backend in use")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY, or X-API-Key) on every "
                        "path but /healthz; other users can read it in the process list, so "
                        "prefer --api-key-file")
    p.add_argument("--api-key-file", default=None, help="read the key from this file's first line")
    p.add_argument("--max-body-bytes", type=int, default=2**20,
                   help="larger request bodies get 413 before they are read (default: 1 MiB)")
    p.add_argument("--client-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request once connected or after "
                        "its previous answer; then the connection is closed (default: 30)")
    p.set_defaults(run=run)


def check_args(args) -> None:
    for flag in ("max_rows", "max_queue", "max_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be ≥ 1")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if not args.deadline > 0:
        raise UserError("--deadline must be > 0 seconds")
    if args.max_body_bytes < 1:
        raise UserError("--max-body-bytes must be ≥ 1")
    if not 0 < args.client_timeout < float("inf"):
        raise UserError("--client-timeout must be a number of seconds > 0")


def api_key(args) -> str | None:
    """The key from --api-key or --api-key-file (None: the server is open)."""
    if args.api_key is not None and args.api_key_file is not None:
        raise UserError("give --api-key or --api-key-file, not both")
    key = args.api_key
    if args.api_key_file is not None:
        try:
            text = Path(args.api_key_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read --api-key-file {args.api_key_file}: {err}") from None
        key = next(iter(text.splitlines()), "")
    if key is not None and not key.strip():
        raise UserError("the API key is empty")
    return None if key is None else key.strip()


def run(args) -> int:
    check_args(args)
    key = api_key(args)
    try:
        import uvicorn

        from cfgengine.serve import create_app
    except ImportError as err:
        raise UserError(f"cfgengine serve needs the [serve] extra ({err.name} is missing): "
                        "pip install 'cfgengine[serve]'") from None
    from cfgengine.serve.guard import server_config

    app = create_app(args.ckpt, device=args.device, backend=args.backend,
                     max_rows=args.max_rows, max_queue=args.max_queue,
                     max_steps=args.max_steps, deadline_s=args.deadline, api_key=key,
                     max_body_bytes=args.max_body_bytes)
    sock = bind(args.host, args.port)
    app.state.service.ready()  # load the model now: a bad --ckpt is a user error, not a 500
    if key is None and not loopback(sock):
        print(f"cfgengine serve: warning: listening on {args.host}, beyond loopback, without "
              "an API key: anyone who reaches this port can sample (--api-key-file)",
              file=sys.stderr, flush=True)
    print(f"cfgengine serve: http://{args.host}:{sock.getsockname()[1]} (docs at /docs)",
          flush=True)
    config = server_config(app, client_timeout_s=args.client_timeout)
    draining_server(uvicorn)(config).run(sockets=[sock])
    return 0


def loopback(sock: socket.socket) -> bool:
    """Whether `sock` listens on a loopback address only."""
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (OSError → one line, exit 2, from the CLI)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(128)
    return sock


def draining_server(uvicorn):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the scheduler before shutting down."""
    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service = self.config.app.state.service
            if service.scheduler is None or service.scheduler.draining:
                self.should_exit = self.force_exit = True  # second signal: now
                return
            service.scheduler.drain()
            threading.Thread(target=self._exit_when_idle, daemon=True).start()

        def _exit_when_idle(self) -> None:
            self.config.app.state.service.scheduler.wait_idle()
            self.should_exit = True

    return DrainingServer
