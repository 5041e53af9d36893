"""The training progress bar (tqdm), or log lines where there is none."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The trainer's name, which these log lines carried before this module was split out of it.
logger = logging.getLogger("edge_sdk.training.trainer")


@dataclass
class ProgressBar:
    """tqdm bar with loss, tokens/s and ETA (tqdm's), or nothing."""

    total: int
    initial: int
    enabled: bool
    bar: Any = None

    def __post_init__(self) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def update(
        self, loss: float, tok_s: float, lr: float, extra: Mapping[str, str] | None = None
    ) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", **(extra or {}),
                refresh=False,
            )  # fmt: skip
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
