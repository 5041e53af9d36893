"""`GlobalAdapterFollower`: the device's copy of the federation's global adapter.

It pulls a new version (ETag), checks it against the task before keeping it, saves it, and
writes it as a GGUF LoRA that it hot-swaps into the app's runtime. A refused version is logged
once and the previous one stays in service.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.errors import AdapterRefusedError
from edge_sdk.client.state import ClientState
from edge_sdk.client.task_policy import Shapes, adapter_bytes_cap
from edge_sdk.client.transport import Transport
from edge_sdk.errors import FedlmError
from edge_sdk.wire import GlobalAdapter, TaskConfig, WireError

if TYPE_CHECKING:
    from edge_sdk.models.identity import ModelIdentity
    from edge_sdk.runtime import EdgeModel

# The federation loop's log lines keep the logger name they had before the loop was split.
log = logging.getLogger("edge_sdk.client.loop")


class GlobalAdapterFollower:
    """The newest accepted global adapter (`current`, `version`) and the one served (`served`)."""

    def __init__(self, config: ClientConfig, state: ClientState) -> None:
        self.config = config
        self.state = state
        self.current: GlobalAdapter | None = None
        """The newest global adapter that passed the checks; None before any."""
        self.version = -1
        """Its version; -1 before any."""
        self.served: tuple[int, Path] | None = None
        """(version, GGUF path) written for (and hot-swapped into) the runtime."""
        self._etag: str | None = None
        self._refused_etag: str | None = None
        self._identity: ModelIdentity | None = None
        self._shapes: Shapes | None = None

    def attach(self, identity: ModelIdentity, shapes: Shapes) -> None:
        """The base model and the shapes of the layers the task adapts (known after the task)."""
        self._identity, self._shapes = identity, shapes

    def load(self, body: bytes, etag: str, task: TaskConfig, source: str) -> GlobalAdapter | None:
        """Decode and check a global adapter; on success it becomes current, else None (logged)."""
        assert self._shapes is not None
        try:
            adapter = GlobalAdapter.from_bytes(body)
            self.config.task_policy.check_global(adapter, task, self._shapes)
        except (WireError, AdapterRefusedError) as exc:
            keep = f"version {self.version}" if self.current is not None else "no adapter"
            log.warning("refused a global adapter from %s: %s; keeping %s", source, exc, keep)
            return None
        self.current, self.version, self._etag = adapter, adapter.version, etag
        return adapter

    async def pull(self, transport: Transport, task: TaskConfig) -> bool:
        """Fetch the global adapter if it changed; True when a newer version arrived.

        A refused adapter's ETag is sent as If-None-Match from then on, so the coordinator
        answers 304 until it publishes another version: one download and one log line per
        bad version, not one per poll.
        """
        assert self._shapes is not None
        cap = adapter_bytes_cap(self._shapes, task.lora.rank)
        resp = await transport.adapter(self._refused_etag or self._etag, max_bytes=cap)
        if resp.body is None:
            return False
        previous = self.version
        if self.load(resp.body, resp.etag, task, transport.base_url) is None:
            self._refused_etag = resp.etag or None
            return False
        self._refused_etag = None
        self.state.save_global(resp.body, self.version, resp.etag, task.task_id)
        if self.version != previous:
            log.info("global adapter version %d", self.version)
        return self.version > previous

    async def swap(self, runtime: EdgeModel | None) -> None:
        """Write the current global adapter as GGUF LoRA and hot-swap it into `runtime`."""
        adapter = self.current
        if adapter is None or (self.served is not None and self.served[0] == adapter.version):
            return
        from edge_sdk.adapters.gguf_lora import BaseModelInfo, write_gguf_lora
        from edge_sdk.errors import RuntimeBusyError

        assert self._identity is not None
        path = self.state.adapter_gguf_path(adapter.version)
        try:
            base = BaseModelInfo.from_gguf(self._identity.path, sha256=self._identity.sha256)
            await asyncio.to_thread(
                write_gguf_lora, path, adapter.dense_tensors(), alpha=adapter.lora.alpha, base=base
            )
        except (FedlmError, ValueError, OSError) as exc:  # AdapterMismatchError is a FedlmError
            log.warning(
                "cannot write global version %d as GGUF (%s); the runtime keeps what it serves",
                adapter.version,
                exc,
            )
            return
        if runtime is not None:
            try:
                await asyncio.to_thread(runtime.load_adapter, path, wait=self.config.swap_wait_s)
            except RuntimeBusyError as exc:
                log.info("hot-swap postponed: %s", exc)
                return
            except (FedlmError, ValueError, OSError) as exc:
                log.warning("the runtime refused global version %d (%s); it keeps what it serves",
                            adapter.version, exc)  # fmt: skip
                return
            log.info("runtime now serves global version %d", adapter.version)
        self.served = (adapter.version, path)
        self.state.prune_adapters(keep=path)
