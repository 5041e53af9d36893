"""Enrollment and the task: the stored credentials if they belong to this coordinator, else a
join; then the task, refused unless it trains the local model within the `TaskPolicy`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edge_sdk.client.config import ClientConfig
from edge_sdk.client.coordinator_finder import CoordinatorFinder
from edge_sdk.client.errors import (
    AuthenticationError,
    ClientError,
    ModelMismatchError,
    TaskRefusedError,
)
from edge_sdk.client.state import ClientState, Credentials
from edge_sdk.client.task_policy import Shapes, target_shapes
from edge_sdk.client.transport import Transport
from edge_sdk.env import JOIN_CODE_ENV, JOIN_TOKEN_ENV
from edge_sdk.wire import TaskConfig

if TYPE_CHECKING:
    from edge_sdk.models.identity import ModelIdentity

# The federation loop's log lines keep the logger name they had before the loop was split.
log = logging.getLogger("edge_sdk.client.loop")


class Enrollment:
    """Credentials and task of a device at the coordinator `transport` talks to."""

    def __init__(self, config: ClientConfig, state: ClientState, finder: CoordinatorFinder) -> None:
        self.config = config
        self.state = state
        self.finder = finder

    async def credentials(self, transport: Transport) -> Credentials:
        """The stored credentials if they belong to this coordinator, else enroll (join)."""
        pin = transport.tls_fingerprint
        stored = self.state.credentials()
        if stored is not None:
            if pin is not None:
                ours = stored.tls_fingerprint is not None and stored.tls_fingerprint.lower() == pin
            else:
                ours = (
                    stored.tls_fingerprint is None
                    and stored.coordinator.rstrip("/") == transport.base_url
                )
            if ours:
                if stored.coordinator.rstrip("/") != transport.base_url:
                    # The same certificate at a new address (DHCP): the pin says it is the same
                    # coordinator, so the credentials follow it.
                    stored = dataclasses.replace(stored, coordinator=transport.base_url)
                    self.state.save_credentials(stored)
                transport.token = stored.token
                return stored
        code = self.finder.join_code()
        if code is not None and pin == code.fingerprint:
            token = code.token
        else:
            token = self.config.join_token or os.environ.get(JOIN_TOKEN_ENV) or ""
            if not token:
                raise ClientError(
                    f"not enrolled at {transport.base_url}: give "
                    "the join code that `fedlm coordinator` "
                    f"prints (--join-code or ${JOIN_CODE_ENV})"
                )
            if pin is None and not self.config.insecure:
                raise self.finder.no_pin_error()
        transport.token = None
        joined = await transport.join(token, self.config.name)
        creds = Credentials(
            transport.base_url,
            joined["client_id"],
            joined["token"],
            joined["task_id"],
            self.config.name,
            pin,
        )
        self.state.save_credentials(creds)
        transport.token = creds.token
        if pin is not None:
            log.info("joined %s as %s; its certificate %s… is pinned in %s", transport.base_url,
                     creds.client_id, pin[:16], self.state.token_path)  # fmt: skip
        else:
            log.info(
                "joined %s as %s (plain HTTP, nothing pinned)", transport.base_url, creds.client_id
            )
        return creds

    async def task(
        self, transport: Transport, identity: ModelIdentity, advertised_model: str
    ) -> tuple[Credentials, TaskConfig, Shapes]:
        """(credentials, the task, the shapes of the layers it adapts), the task checked.

        `advertised_model`: the model name of the coordinator's advert, for the mismatch error.
        """
        creds = await self.credentials(transport)
        try:
            task = await transport.task()
        except AuthenticationError:
            # The coordinator forgot us (new database): enroll again if we can.
            log.warning("the coordinator refused the stored token; joining again")
            self.state.forget_credentials()
            creds = await self.credentials(transport)
            task = await transport.task()
        if task.model_sha256 != identity.sha256:
            theirs = f"{advertised_model!r} " if advertised_model else ""
            raise ModelMismatchError(
                f"the task {task.task_id} trains model "
                f"{theirs}({task.model_sha256[:16]}…), the local model "
                f"{Path(identity.path).name!r} ({identity.name or 'unnamed'}) is "
                f"{identity.sha256[:16]}…; refusing to train"
            )
        self.config.task_policy.check_task(task)  # before anything is sized by the task
        shapes = await asyncio.to_thread(model_target_shapes, identity, task)
        return creds, task, shapes


def model_target_shapes(identity: ModelIdentity, task: TaskConfig) -> Shapes:
    """(out, in) of the base model's layers the task adapts; every target must exist."""
    from edge_sdk.adapters.gguf_lora import BaseModelInfo

    base = BaseModelInfo.from_gguf(identity.path, sha256=identity.sha256)
    shapes = target_shapes(base.tensor_shapes, task.lora.targets)
    found = {module.rsplit(".", 1)[-1] for module in shapes}
    missing = [t for t in task.lora.targets if t not in found]
    if missing:
        raise TaskRefusedError(
            f"task {task.task_id}: `lora.targets` {missing} name layers the base model "
            f"{Path(identity.path).name} does not have; refusing the task"
        )
    return shapes
