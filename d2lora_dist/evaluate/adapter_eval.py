"""Evaluate a base model, optionally with an adapter, on a list of suites (data-parallel, no ZeRO)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d2lora_dist import adapters, distributed
from d2lora_dist.base_cache import FreshBase
from d2lora_dist.config import Experiment
from d2lora_dist.data.selection import suite_items
from d2lora_dist.modeling import attach_lora, base_fingerprint
from d2lora_dist.residual import adapter_residual


@contextmanager
def loaded_for_eval(exp: Experiment, adapter_dir: Path | None,
                    models: FreshBase | None = None) -> Iterator[tuple[Any, Any]]:
    """Full model on every rank (generation under ZeRO-3 is unusably slow); adapter verified, on the
    residual base its manifest names when it was trained from PiSSA/OLoRA (residual.py).

    `models`: where the tokenizer and base come from (loaded here by default; a cell worker's shared
    base is given back without the adapter, and with its own weights, when the block ends)."""
    models = models or FreshBase()
    distributed.init_process_group()  # under `accelerate launch` the ranks split the items
    distributed.leave_zero3()
    gc.collect()
    tokenizer = models.tokenizer(exp.model)
    state, residual = None, None
    if adapter_dir is not None:
        from d2lora_dist.train import lora_summary

        state, manifest = adapters.load_adapter_state(adapter_dir, base_fingerprint(exp.model), lora_summary(exp))
        residual = adapter_residual(exp, manifest)
    with models.base(exp.model, training=False) as model:
        if state is not None:
            model = attach_lora(model, exp.lora, state, residual=residual, before_overwrite=models.before_overwrite)
        model.to(distributed.device()).eval()
        yield model, tokenizer


def load_for_eval(exp: Experiment, adapter_dir: Path | None) -> tuple[Any, Any]:
    """A freshly loaded model with the adapter, ready to evaluate (the caller owns it)."""
    with loaded_for_eval(exp, adapter_dir) as (model, tokenizer):
        return model, tokenizer


def evaluate_suites(exp: Experiment, task: str | None, suites: list[str], adapter_dir: Path | None,
                    predictions_path: Any, progress: bool = True,
                    models: FreshBase | None = None) -> dict[str, dict[str, Any]]:
    """Run each suite; `predictions_path(suite)` says where its JSONL goes."""
    from d2lora_dist.evaluate.suites import run_suite

    metrics: dict[str, dict[str, Any]] = {}
    with loaded_for_eval(exp, adapter_dir, models) as (model, tokenizer):
        for suite in suites:
            cfg = exp.suites[suite]
            items = suite_items(exp, suite, task)
            metrics[suite] = run_suite(cfg.kind, items, model, tokenizer, cfg, Path(predictions_path(suite)),
                                       progress=progress and distributed.is_main_process())
            if distributed.is_main_process():
                print(f"  {suite}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in metrics[suite].items()), flush=True)
        del model
    gc.collect()
    return metrics
