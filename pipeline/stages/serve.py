"""The prediction service: a model loaded once (its backbones and head, as ``predict`` loads them) behind
an HTTP API on FastAPI and uvicorn (the ``serve`` extra: ``pip install -e '.[serve]'`` in the repository).

- ``POST /predict``: one or several images as multipart uploads in the field ``file`` (repeatable); a JSON
  list with one row per upload, in order, with the columns ``predict`` writes (``path`` is the upload's
  file name; from a run folder, ``ood_score`` and ``ood`` too, and ``prediction_set`` with a ``coverage``:
  the same :class:`LoadedModel` makes them). An upload that cannot be decoded makes the request a 422 naming it and why; a request
  body over ``max_bytes`` is a 413, refused by its Content-Length before it is read.
- ``GET /health``: ``ok``, and how many requests, images and forward passes it has served.
- ``GET /model``: the model's row, its protocol, classes, head and feature specs.

Requests that arrive together are predicted in one forward pass: each request's images join a queue,
and one task takes what has arrived (waiting up to ``max_wait_ms`` for more, up to ``max_batch`` images),
predicts it in a thread (the server keeps accepting meanwhile) and answers each request its rows. Every
image goes through the model's feature spec; the cache the head was fit on is not read, so the service
needs none, and its answers are ``predict``'s for images that are not in that cache.
"""

import asyncio
import logging
import os
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..data import Member, Sample
from ..errors import PipelineError
from .predict import LoadedModel
from ..validation import at_least, between, validate_params

DEFAULT_MAX_BYTES = 20 * 2 ** 20
MAX_BATCH = 32
MAX_WAIT_MS = 2.0  # short: requests that arrive while a pass runs join the next one anyway
APP_RULES = dict(max_bytes=at_least(1), max_batch=at_least(1), max_wait_ms=at_least(0))


def _require_extra():
    try:
        import fastapi
        import multipart  # noqa: F401  (python-multipart: FastAPI parses uploads with it)
        import uvicorn
    except ImportError as e:
        raise PipelineError(f"serve needs {e.name}: pip install -e '.[serve]' (in the repository)") from None
    return fastapi, uvicorn


@dataclass
class _Counts:
    requests: int = 0
    images: int = 0
    forward_passes: int = 0


@dataclass
class Batcher:
    """One queue of requests, predicted by one task a batch at a time (see the module docstring)."""

    loaded: LoadedModel
    max_batch: int
    max_wait: float  # seconds
    counts: _Counts = field(default_factory=_Counts)

    def __post_init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    async def predict(self, samples: list[Sample]) -> list[dict]:
        """The rows of ``samples``, once the batch they joined has been predicted."""
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((samples, done))
        rows = await done
        self.counts.requests += 1
        self.counts.images += len(samples)
        return rows

    async def run(self) -> None:
        """Forever: take the requests waiting (and those arriving within ``max_wait``), predict them together."""
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while sum(len(s) for s, _ in waiting) < self.max_batch:
                if not self.queue.empty():  # those that queued while the last pass ran
                    waiting.append(self.queue.get_nowait())
                    continue
                try:
                    waiting.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except TimeoutError:
                    break
            samples = [s for request, _ in waiting for s in request]
            try:
                rows = await asyncio.to_thread(self.loaded.predict, samples, self.max_batch)
            except Exception as e:  # a failed pass fails its requests (a 500 each), never the service
                for _, done in waiting:
                    if not done.done():
                        done.set_exception(e)
                continue
            self.counts.forward_passes += -(-len(samples) // self.max_batch)
            start = 0
            for request, done in waiting:
                if not done.done():  # its client may have gone
                    done.set_result(rows[start:start + len(request)])
                start += len(request)


def upload_sample(name: str, data: bytes) -> Sample:
    """An upload as a sample: its bytes, in memory, read by the decode path as a container member's are."""
    return Sample(name, Member(Path(name), 0, len(data), reader=lambda _: data))


@validate_params(APP_RULES)
def create_app(model: str | os.PathLike, task: str | None = None, row: int | None = None,
               weights: Sequence[str | os.PathLike] = (), device: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES,
               max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS, coverage: float | None = None,
               ood_percentile: float = 99.0):
    """The FastAPI app serving ``model`` (a fit run folder: its best row, of ``task``, or its row ``row``;
    a ``.skops`` head; a fine-tuned model folder), loaded now; run it with any ASGI server. ``coverage``
    and ``ood_percentile`` are ``predict``'s."""
    fastapi, _ = _require_extra()
    # FastAPI reads the endpoints' annotations as objects: this module has no `from __future__ import annotations`
    from fastapi import File, HTTPException, UploadFile

    loaded = LoadedModel(model, task, row, weights, device, from_cache=False, coverage=coverage,
                         ood_percentile=ood_percentile).load()
    batcher = Batcher(loaded, max_batch, max_wait_ms / 1000)
    about = dict(model=str(model), **loaded.describe(),
                 serving=dict(max_bytes=max_bytes, max_batch=max_batch, max_wait_ms=max_wait_ms, device=device))

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = fastapi.FastAPI(title="pipeline serve", lifespan=lifespan,
                          description=f"Predictions of {model} ({loaded.model.task_kind})")
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

    @app.post("/predict")
    async def predict(file: list[UploadFile] = File(..., description="image files; repeat the field for several")):
        samples = [upload_sample(f.filename or f"upload{k}", await f.read()) for k, f in enumerate(file)]
        rows = await batcher.predict(samples)
        failed = [dict(file=r["path"], error=r["error"]) for r in rows if r["error"]]
        if failed:
            raise HTTPException(422, detail=failed)
        return rows

    @app.get("/health")
    async def health():
        return dict(status="ok", **vars(batcher.counts))

    @app.get("/model")
    async def describe():
        return about

    return app


class BodyLimit:
    """ASGI middleware: a request whose body is over ``max_bytes`` gets a 413, by its Content-Length before
    any of it is read, else once that many bytes have arrived."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": self._words(int(declared))}, 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI answers an HTTPException raised while it reads the body
                raise HTTPException(413, self._words(seen))
            return message

        await self.app(scope, counted, send)

    def _words(self, size: int) -> str:
        return f"the request is {size:,} bytes or more; this service takes at most {self.max_bytes:,} (--max-bytes)"


@validate_params(dict(port=between(0, 65535), **APP_RULES))
def serve(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, task: str | None = None,
          row: int | None = None, weights: Sequence[str | os.PathLike] = (), device: str = "auto",
          max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
          log_level: str = "info") -> None:
    """Serve ``model`` on ``host``:``port`` until interrupted (SIGINT or SIGTERM end it cleanly: requests
    in flight are answered first). Binds to loopback unless ``host`` says otherwise."""
    _, uvicorn = _require_extra()
    sock = _listening(host, port)  # before the model loads: a busy port fails at once
    app = create_app(model, task, row, weights, device, max_bytes, max_batch, max_wait_ms)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)  # sets up uvicorn's loggers
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Ctrl-C or SIGTERM stops it)", url)
    uvicorn.Server(config).run(sockets=[sock])


def _listening(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` for the service, or a PipelineError saying why not."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PipelineError(f"cannot listen on {host}:{port}: {e.strerror}; another service may hold it: "
                            "choose another --port") from None
    return sock
