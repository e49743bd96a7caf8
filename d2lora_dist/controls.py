"""The control arms (inits.py): what each changes about a phase, in one place.

D2LoRA differs from a fresh LoRA in three ways at once: it takes more optimizer steps (the warm-up's),
it starts with B ≠ 0, and those steps saw general instruction data. Each control takes one of them
alone (docs/choices.md):

- `lora_matched`: a fresh adapter given the warm-up's optimizer steps on the task's own rows, so it
  takes as many steps as the warm-up and the task together (`matched_settings`);
- `d2lora_placebo`: a warm-up of the same size, steps and learning rate whose responses are shuffled
  across its prompts (`placebo_records`: the same tokens, no instruction-following signal), then the
  same task adaptation;
- `random_b`: a fresh adapter (A drawn by the cell's seed as in vanilla LoRA) whose B is a seeded
  Gaussian with the per-module Frobenius norm the warm-up's B reached (`b_norms`, `draw_random_b`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2lora_dist import adapters
from d2lora_dist.config import Experiment, TrainSettings
from d2lora_dist.data.loading import DataError
from d2lora_dist.errors import InputError

# Separate random streams: B must not reuse the bits that drew A from the same seed, nor the placebo's
# order the bits of the warm-up's row order.
_B_STREAM = 0xB0B0_0000
_PLACEBO_STREAM = 0x9_1ACE_B0


def placebo_records(records: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[int]]:
    """The warm-up's rows with every response moved to another row's prompt, and for each row the index of
    the row its response now comes from. A seeded cyclic shift along a seeded order: a permutation with
    no fixed point, so no prompt keeps its own response."""
    if len(records) < 2:
        raise DataError(f"a placebo warm-up shuffles responses across prompts, so it needs at least 2 rows "
                        f"(got {len(records)}); raise the warm-up's n")
    missing = [i for i, r in enumerate(records) if "completion" not in r]
    if missing:
        raise DataError(f"placebo warm-up: row {missing[0]} has no SFT `completion` to shuffle")
    order = np.random.default_rng([_PLACEBO_STREAM, seed]).permutation(len(records)).tolist()
    source = [0] * len(records)
    for j, row in enumerate(order):
        source[row] = order[(j + 1) % len(order)]
    return [{**r, "completion": records[source[i]]["completion"]} for i, r in enumerate(records)], source


def warmup_steps(exp: Experiment, warmup: str) -> int:
    """The optimizer steps warm-up `warmup` takes, from its settings and its row count alone (as the
    schedule plans them before training), so lora_matched never waits for the warm-up to run."""
    from d2lora_dist.data.selection import warmup_records
    from d2lora_dist.schedule import plan_schedule

    cfg = exp.warmup_configs()[warmup]
    rows = cfg.n if cfg.n is not None else len(warmup_records(exp, warmup)[0])
    return plan_schedule(cfg.train, rows, 1).optimizer_steps


def matched_settings(exp: Experiment, warmup: str, settings: TrainSettings,
                     examples: int) -> tuple[TrainSettings, dict[str, Any]]:
    """lora_matched's settings: the task's, with min_steps (max_steps when that is fixed) raised so the
    phase takes the warm-up's steps plus the task's own on the task's `examples` rows; and the record of it."""
    from d2lora_dist.schedule import plan_schedule

    task = plan_schedule(settings, examples, 1).optimizer_steps
    extra = warmup_steps(exp, warmup)
    matched = replace(settings, max_steps=settings.max_steps + extra) if settings.max_steps > 0 else \
        replace(settings, min_steps=task + extra)
    return matched, {"control": "lora_matched", "warmup": warmup, "warmup_steps": extra, "task_steps": task,
                     "optimizer_steps": task + extra,
                     "how": "max_steps" if settings.max_steps > 0 else "min_steps"}


def b_norms(adapter_dir: Path) -> dict[str, float]:
    """Each module's ||B||_F in a (warm-up) adapter, by PEFT's state-dict key."""
    state, _ = adapters.load_adapter_state(adapter_dir)
    return {key: float(value.float().norm()) for key, value in state.items() if "lora_B" in key}


def random_b_state(state: dict[str, torch.Tensor], norms: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
    """`state` with each B replaced by a Gaussian draw of the cell's seed scaled to its module's norm;
    A and everything else untouched. The same on every rank (a CPU generator, keys in sorted order)."""
    keys = sorted(k for k in state if "lora_B" in k)
    if set(keys) != set(norms):
        raise InputError(f"random_b: the warm-up adapter's B modules ({len(norms)}) are not this adapter's "
                         f"({len(keys)}): first difference {sorted(set(keys) ^ set(norms))[:1]}")
    generator = torch.Generator().manual_seed(_B_STREAM + seed)
    out = dict(state)
    for key in keys:
        draw = torch.randn(state[key].shape, generator=generator, dtype=torch.float32)
        out[key] = (draw * (norms[key] / float(draw.norm()))).to(state[key].dtype)
    return out


def draw_random_b(model: Any, norms: dict[str, float], seed: int) -> None:
    """Replace the freshly attached adapter's B (zero) by random_b_state's draw, in place. Collective
    under ZeRO-3 (the state is gathered, then loaded as a warm start is)."""
    import peft

    state = random_b_state(adapters.gathered_state_dict(model), norms, seed)
    peft.set_peft_model_state_dict(model, state, adapter_name="default")
