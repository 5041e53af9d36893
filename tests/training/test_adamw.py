"""The adapter's AdamW equals torch.optim.AdamW and loads its checkpoints."""

from __future__ import annotations

import pytest
import torch

from edge_sdk.training.adamw import AdapterAdamW


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((8, 16), (32, 8), (5,))]


def _grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_torch_adamw_with_changing_lr(weight_decay: float) -> None:
    ours_p, ref_p = _params(), _params()
    ours = AdapterAdamW(ours_p, lr=1e-2, weight_decay=weight_decay)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=weight_decay)
    for step in range(6):
        for opt in (ours, ref):
            opt.param_groups[0]["lr"] = 1e-2 * (step + 1) / 6  # what the trainer's schedule does
        _grads(ours_p, step)
        _grads(ref_p, step)
        if step == 3:  # a tensor without a gradient is left alone by both
            ours_p[2].grad = ref_p[2].grad = None
        ours.step()
        ref.step()
        ours.zero_grad()
        ref.zero_grad()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert all(p.grad is None for p in ours_p)


def test_state_dict_round_trips_both_ways() -> None:
    ref_p = _params()
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    for step in range(3):
        _grads(ref_p, step)
        ref.step()
    # A checkpoint written by torch.optim.AdamW (before this class) resumes here, and back.
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    ours = AdapterAdamW(ours_p, lr=1e-2)
    ours.load_state_dict(ref.state_dict())
    again = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ref_p], lr=1e-2)
    again.load_state_dict(ours.state_dict())
    for step in range(3, 5):
        for ps, opt in ((ref_p, ref), (ours_p, ours), (again.param_groups[0]["params"], again)):
            _grads(ps, step)
            opt.step()
    for a, b, c in zip(ours_p, ref_p, again.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7)


def test_bad_state_is_refused() -> None:
    opt = AdapterAdamW(_params(), lr=1e-2)
    other = torch.optim.AdamW(_params()[:2], lr=1e-2)
    with pytest.raises(ValueError, match="covers 2 tensors, the adapter has 3"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="`lr` should be >= 0"):
        AdapterAdamW(_params(), lr=-1.0)
    with pytest.raises(ValueError, match="empty parameter list"):
        AdapterAdamW([])
