"""A hostile (or broken) coordinator: a real aiohttp server on 127.0.0.1 that speaks the client's
REST API, but answers whatever a test tells it to: oversized bodies, hostile tasks, bad global
adapters. Every request it saw is counted, so a test can assert what the client did next.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import numpy as np
from aiohttp import web

from coordinator.next_version import AggregationConfig, initial_adapter
from coordinator.shapes import shapes_from_gguf
from edge_sdk.models.identity import model_sha256
from edge_sdk.wire import CONTENT_TYPE, GlobalAdapter, LoraSpec, TaskConfig
from tests.client.helpers import TARGETS

MIB = 1 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def tiny_task(model: Path, **overrides: Any) -> TaskConfig:
    """A valid task for the tiny model: exact LoRA r=4 on q/v, 1 local step, fp32 updates."""
    values: dict[str, Any] = {
        "task_id": "task-hostile",
        "model_sha256": model_sha256(model),
        "lora": LoraSpec(rank=4, alpha=8.0, targets=TARGETS, mode="exact", a_seed=0),
        "codec": "fp32",
        "local_steps": 1,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-2,
        "extra": {"strategy": {"name": "fedbuff", "max_staleness": 4}},
    }
    values.update(overrides)
    return TaskConfig(**values)


def good_tensors(model: Path, task: TaskConfig) -> dict[str, np.ndarray]:
    """Version-0 tensors of `task` (seeded A, B = 0), as the real coordinator makes them."""
    agg = AggregationConfig(mode="exact", rank=task.lora.rank, alpha=task.lora.alpha)
    return initial_adapter(agg, shapes_from_gguf(model, task.lora.targets))


def global_body(version: int, lora: LoraSpec, tensors: dict[str, np.ndarray]) -> bytes:
    return GlobalAdapter(version=version, lora=lora, tensors=tensors, codec="fp32").to_bytes()


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


class HostileCoordinator:
    """The REST API on 127.0.0.1:0. `task` is served as JSON; `adapters` are served in turn
    (the next one once the client sent an update), honouring If-None-Match like the real one.
    Set `handlers[path]` to replace an endpoint (e.g. with a 400 MiB stream)."""

    def __init__(self, task: TaskConfig, adapters: list[bytes] | None = None) -> None:
        self.task = task
        self.adapters = list(adapters or [])
        self.current = 0
        self.handlers: dict[str, Handler] = {}
        self.requests: Counter[str] = Counter()
        self.adapter_downloads: Counter[int] = Counter()
        """Index of the adapter -> how many times its body (200) was sent."""
        self.updates: list[bytes] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=64 * MIB)
        for method, path, handler in (
            ("POST", "/v1/join", self._join),
            ("GET", "/v1/task", self._task),
            ("GET", "/v1/adapter", self._adapter),
            ("POST", "/v1/updates", self._updates),
        ):
            app.router.add_route(method, path, self._dispatch(path, handler))
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _dispatch(self, path: str, default: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests[path] += 1
            return await self.handlers.get(path, default)(request)

        return handle

    async def _join(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(
            {"client_id": "c-1", "token": "t" * 43, "task_id": self.task.task_id}
        )

    async def _task(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.task.to_json_dict())

    async def _adapter(self, request: web.Request) -> web.StreamResponse:
        if not self.adapters:
            return web.json_response(
                {"error": {"code": "none", "message": "no adapter"}}, status=404
            )
        body = self.adapters[min(self.current, len(self.adapters) - 1)]
        etag = etag_of(body)
        headers = {"ETag": etag, "X-Fedlm-Version": str(GlobalAdapter.from_bytes(body).version)}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        self.adapter_downloads[min(self.current, len(self.adapters) - 1)] += 1
        return web.Response(body=body, content_type=CONTENT_TYPE, headers=headers)

    async def _updates(self, request: web.Request) -> web.StreamResponse:
        self.updates.append(await request.read())
        self.current += 1
        return web.json_response({"pending": 0}, status=202)


def streaming(
    total: int, *, content_length: bool = False, status: int = 200
) -> tuple[Handler, list[int]]:
    """A handler that streams `total` bytes generated on the fly (1 MiB chunks, never held);
    the list gets the number of bytes the client took before it hung up."""
    sent = [0]
    chunk = b"[" + b"0," * (MIB // 2 - 1) + b"0"  # 1 MiB of something JSON-ish

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        if content_length:
            resp.content_length = total
        await resp.prepare(request)
        try:
            while sent[0] < total:
                part = chunk[: total - sent[0]]
                await resp.write(part)
                sent[0] += len(part)
        except (ConnectionResetError, RuntimeError, OSError):
            pass  # the client hung up: what we wanted
        return resp

    return handle, sent


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
