"""The fedlm coordinator: an aiohttp service on the LAN that aggregates LoRA adapter updates.

numpy only (no torch, no llama.cpp). Public face:

    from coordinator import CoordinatorConfig, Service, build_app
    async with Service(config) as service: ...

The math is in `coordinator.lora_math` (pure functions) and `coordinator.next_version` (one
aggregation step), strategies in `coordinator.strategies`, storage in `coordinator.storage`.
"""

from __future__ import annotations

from coordinator.config import CoordinatorConfig
from coordinator.errors import CoordinatorError
from coordinator.lora_math import frozen_a_matrix
from coordinator.next_version import MODES, ROBUST, AggregationConfig
from coordinator.privacy import DpConfig
from coordinator.server import Service, build_app, serve
from coordinator.state_machine import Coordinator
from coordinator.storage import SQLiteStorage, Storage
from coordinator.strategies import FedAvg, FedBuff, Strategy

__all__ = [
    "MODES",
    "ROBUST",
    "AggregationConfig",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorError",
    "DpConfig",
    "FedAvg",
    "FedBuff",
    "SQLiteStorage",
    "Service",
    "Storage",
    "Strategy",
    "build_app",
    "frozen_a_matrix",
    "serve",
]
