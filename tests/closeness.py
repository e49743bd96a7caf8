"""Tensors computed along two different code paths, compared in a form that holds on any x86-64 CPU.

Two paths that sum the same terms in another order (another batch shape, accumulation split, rank
split, thread split, SIMD width, oneDNN/MKL kernel) differ by about eps * sqrt(n) relative to the
size of the terms, not to each element: an element that is a near-cancelling sum (a gradient
component close to zero) can differ by all of itself. So a comparison scales by the whole tensor,
||a - b|| / ||b||, never elementwise rtol/atol, which holds only on the CPU it was tuned on.

Training along two paths is compared under SGD (`train_with_sgd`): its step is linear in the
gradient, so a path difference stays a rounding-sized fraction of the update. Adam's first steps
are about lr * sign(g): a near-zero gradient component whose sign flips under another summation
order moves by a full step, and the trained tensors then differ by more than a bound tight enough
to catch a genuinely different update (a row dropped, a loss averaged otherwise).

Bit-for-bit comparisons of one path run twice (a cell run again, a cell in a worker or its own
process, one slot or two) do not belong here: there the same operations run in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from d2lora_dist import adapters

# float32 (eps 1.2e-7) sums of up to ~1e4 terms in another order: ~1e-6 relative; measured 1e-7 to
# 2e-6 (padding-free vs padded, micro-batches vs accumulation, ZeRO-3 vs one process; the first also
# under ATEN_CPU_CAPABILITY default and avx2, 1 and 2 threads). A genuine difference (one row dropped, one
# token's loss left out, positions not restarting) moves a gradient by 2e-2 or more.
SUMMATION_ORDER = 1e-4


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| in float64; 0.0 when both are exactly zero (a lora_A
    gradient at step 1, when lora_B is still zero), inf when only `expected` is."""
    got, expected = got.detach().double(), expected.detach().double()
    diff, scale = float(torch.linalg.norm(got - expected)), float(torch.linalg.norm(expected))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def differences(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """relative_difference per tensor; the two must hold the same names and shapes."""
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    for key in expected:
        assert got[key].shape == expected[key].shape, (key, got[key].shape, expected[key].shape)
    return {key: relative_difference(got[key], expected[key]) for key in expected}


def assert_close_in_norm(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                         rtol: float = SUMMATION_ORDER, what: str = "") -> None:
    """Every tensor of `got` within rtol of `expected`'s norm; the message names each one that is not."""
    far = {key: value for key, value in differences(got, expected).items() if not value <= rtol}
    assert not far, f"{what}: ||a - b|| / ||b|| above {rtol:g}: {far}"


def assert_same_update(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                       start: dict[str, torch.Tensor], steps: int, rtol: float = SUMMATION_ORDER) -> None:
    """Two trainings from `start` (the same tensors) took the same update, up to summation order:
    ||got - expected|| <= rtol * ||expected - start|| + steps * eps * ||expected|| per tensor.

    The second term is float32's resolution of the weights: each step rounds w + update to a
    representable value, and two paths may round one element to neighbours, up to one unit in
    the last place (ulp(w) <= eps * |w|) apart per step. Without it a tensor whose update is near
    that resolution (the tiny model's q_proj lora_A moves ~1e-6 under SGD) would compare roundings."""
    assert got.keys() == expected.keys() == start.keys(), sorted(set(got) ^ set(expected) ^ set(start))
    eps = torch.finfo(torch.float32).eps
    far = {}
    for key in expected:
        got_key, expected_key, start_key = (t.detach().double() for t in (got[key], expected[key], start[key]))
        diff = float(torch.linalg.norm(got_key - expected_key))
        bound = (rtol * float(torch.linalg.norm(expected_key - start_key))
                 + steps * eps * float(torch.linalg.norm(expected_key)))
        if not diff <= bound:
            far[key] = (diff, bound)
    assert not far, f"update: ||a - b|| above rtol * ||update|| + steps * eps * ||b|| (difference, bound): {far}"


class StartAndGradients(TrainerCallback):
    """The adapter as training begins, and its gradients at every optimizer step (after clipping:
    what the optimizer receives), in PEFT's file naming."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.start = adapters.gathered_state_dict(model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        named = {name.replace(".default", ""): p.grad.detach().clone()
                 for name, p in model.named_parameters() if p.requires_grad}
        assert named.keys() == self.start.keys(), sorted(set(named) ^ set(self.start))
        self.gradients.append(named)


def train_with_sgd(monkeypatch: Any) -> None:
    """Every phase trained from here on (train.train_phase in this process) steps with plain SGD
    instead of AdamW, so that two paths' trained tensors can be compared (see the module docstring)."""
    from transformers.training_args import OptimizerNames

    from d2lora_dist import train

    build = train.training_arguments

    def sgd_arguments(*args: Any, **kwargs: Any) -> Any:
        arguments = build(*args, **kwargs)
        arguments.optim = OptimizerNames.SGD
        return arguments

    monkeypatch.setattr(train, "training_arguments", sgd_arguments)
