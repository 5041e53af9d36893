"""AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) for the adapter, without torch.optim.

Why not `torch.optim.AdamW`: every `torch.optim.Optimizer` imports `torch._dynamo` (its
`add_param_group` is wrapped in `torch._disable_dynamo`), which imports `torch._inductor`:
~70 MB of RSS and 1-9 s on this machine for a process that never compiles anything. This class
runs the same arithmetic as torch's single-tensor AdamW path (the CPU default), op for op, so
the two give the same parameters (tested), with the moments of all adapter tensors updated
by `torch._foreach_*` calls (a few launches per step instead of ~8 per tensor).

`state_dict()` has torch's layout ({"state": {i: {"step", "exp_avg", "exp_avg_sq"}},
"param_groups": [...]}) so checkpoints written before this class load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class AdapterAdamW:
    """Decoupled-weight-decay Adam over a list of tensors, one parameter group."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("AdapterAdamW got an empty parameter list")
        if not lr >= 0.0:
            raise ValueError(f"`lr` should be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"`betas` should be in [0, 1), got {betas!r}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(
                f"`eps` and `weight_decay` should be >= 0, got {eps!r}, {weight_decay!r}"
            )
        self.param_groups: list[dict[str, Any]] = [
            {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        ]
        """One group, as torch's: the trainer sets `param_groups[0]["lr"]` each step."""
        self.steps = [0.0] * len(self.params)
        self.exp_avg = [
            torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params
        ]
        self.exp_avg_sq = [
            torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every tensor that has a gradient."""
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = (
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
        )
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        params: list[torch.Tensor] = [self.params[i] for i in idx]
        grads = [p.grad for p in params if p.grad is not None]
        m = [self.exp_avg[i] for i in idx]
        v = [self.exp_avg_sq[i] for i in idx]
        for i in idx:
            self.steps[i] += 1.0
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(m, grads, 1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1.0 - beta2)
        # Bias corrections per tensor (steps can differ after a resume with frozen A); grouped
        # by step count so the common case is one foreach call each.
        by_step: dict[float, list[int]] = {}
        for k, i in enumerate(idx):
            by_step.setdefault(self.steps[i], []).append(k)
        for step, ks in by_step.items():
            bc1 = 1.0 - beta1**step
            bc2_sqrt = math.sqrt(1.0 - beta2**step)
            denom = torch._foreach_sqrt([v[k] for k in ks])
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_([params[k] for k in ks], [m[k] for k in ks], denom, -lr / bc1)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's layout (tensors are copies)."""
        group = self.param_groups[0]
        return {
            "state": {
                i: {
                    "step": torch.tensor(self.steps[i]),
                    "exp_avg": self.exp_avg[i].clone(),
                    "exp_avg_sq": self.exp_avg_sq[i].clone(),
                }
                for i in range(len(self.params))
                if self.steps[i] > 0
            },
            "param_groups": [
                {
                    "lr": group["lr"],
                    "betas": group["betas"],
                    "eps": group["eps"],
                    "weight_decay": group["weight_decay"],
                    "amsgrad": False,
                    "maximize": False,
                    "foreach": None,
                    "capturable": False,
                    "differentiable": False,
                    "fused": None,
                    "decoupled_weight_decay": True,
                    "params": list(range(len(self.params))),
                }
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load our own or `torch.optim.AdamW`'s state dict for the same parameter list."""
        groups = state.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError(f"optimizer state should have one parameter group, got {groups!r:.80}")
        n = len(groups[0].get("params", ()))
        if n != len(self.params):
            raise ValueError(
                f"optimizer state covers {n} tensors, the adapter has {len(self.params)}"
            )
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in groups[0]:
                self.param_groups[0][key] = (
                    tuple(groups[0][key]) if key == "betas" else groups[0][key]
                )
        for i, p in enumerate(self.params):
            s = state.get("state", {}).get(i)
            if s is None:
                self.steps[i] = 0.0
                self.exp_avg[i].zero_()
                self.exp_avg_sq[i].zero_()
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(s[key].shape) != tuple(p.shape):
                    raise ValueError(
                        f"optimizer state {key} of tensor {i} has shape {tuple(s[key].shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
            self.steps[i] = float(s["step"])
            self.exp_avg[i].copy_(s["exp_avg"])
            self.exp_avg_sq[i].copy_(s["exp_avg_sq"])


__all__ = ["AdapterAdamW"]
