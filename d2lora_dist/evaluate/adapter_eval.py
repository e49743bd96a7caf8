"""Evaluate a base model, optionally with an adapter, on a list of suites (data-parallel, no ZeRO)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from d2lora_dist import adapters, distributed
from d2lora_dist.config import Experiment
from d2lora_dist.data.selection import suite_items
from d2lora_dist.modeling import attach_lora, base_fingerprint, load_base_model, load_tokenizer


def load_for_eval(exp: Experiment, adapter_dir: Path | None) -> tuple[Any, Any]:
    """Full model on every rank (generation under ZeRO-3 is unusably slow); adapter verified."""
    distributed.init_process_group()  # under `accelerate launch` the ranks split the items
    distributed.leave_zero3()
    gc.collect()
    tokenizer = load_tokenizer(exp.model)
    model = load_base_model(exp.model, training=False)
    if adapter_dir is not None:
        from d2lora_dist.train import lora_summary

        state, _ = adapters.load_adapter_state(adapter_dir, base_fingerprint(exp.model), lora_summary(exp))
        model = attach_lora(model, exp.lora, state)
    model.to(distributed.device()).eval()
    return model, tokenizer


def evaluate_suites(exp: Experiment, task: str | None, suites: list[str], adapter_dir: Path | None,
                    predictions_path: Any, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run each suite; `predictions_path(suite)` says where its JSONL goes."""
    from d2lora_dist.evaluate.suites import run_suite

    model, tokenizer = load_for_eval(exp, adapter_dir)
    metrics: dict[str, dict[str, Any]] = {}
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
