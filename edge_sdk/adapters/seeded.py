"""Seeded LoRA initialisation shared by devices and the coordinator (numpy only).

A federation in `frozen-a` mode never sends A: every party regenerates it from a shared seed,
so the generator must give the same bits on every platform and numpy release.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def frozen_a_matrix(seed: int, shape: tuple[int, int], key: str = "") -> np.ndarray:
    """Deterministic `lora_A` (r, in), float32, identical on every platform and numpy version.

    The distribution is PEFT's default init, kaiming-uniform with a=√5, i.e. U(-1/√in, 1/√in).
    `key` (the tensor name) gives each layer its own matrix. Only the PCG64 raw stream and
    `SeedSequence` are used, both of which numpy keeps stable across releases (NEP 19); the
    distribution methods of `Generator` are not guaranteed stable, so they are avoided.
    Client trainers must use this same function for `frozen-a` mode.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` should be a non-negative integer, got {seed!r}")
    rank, n_in = (int(shape[0]), int(shape[1]))
    if rank <= 0 or n_in <= 0:
        raise ValueError(f"`shape` should be two positive integers, got {shape!r}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    generator = np.random.PCG64(np.random.SeedSequence([seed, *words]))
    raw = generator.random_raw(rank * n_in)  # uint64
    uniform = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)  # [0, 1)
    bound = 1.0 / math.sqrt(n_in)
    return ((2.0 * uniform - 1.0) * bound).astype(np.float32).reshape(rank, n_in)
