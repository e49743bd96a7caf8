"""Training step time: the framework's SFT phase against a plain TRL script, and padded against padding-free.

    .venv/bin/python benchmarks/train_vs_trl.py [--steps 20] [--repeats 2] [--quick]

Same model, rows, LoRA, batch, max_length, learning rate, schedule and optimizer steps, taken from
an experiment file (default launch/experiments/study_cpu.yaml: SmolLM2-135M-Instruct from the offline
assets, its `titles` task, `methods.sft`). Three runs, each a fresh model load and trainer, alternate
(A B C A B C ...) so that the load of other processes falls on all of them alike:

- A `framework-padded`: d2lora_dist.train.train_phase with `batching: padded`, the whole phase
  (data, schedule, model, LoRA, TRL trainer, update size, adapter artifact);
- B `trl-padded`: a plain script: AutoModelForCausalLM + trl.SFTTrainer with `peft_config`, the
  rows as they reach the framework's trainer, TRL's own padded batches;
- C `framework-padding-free`: A with `batching: padding_free`.

Each run records the time of every optimizer step (a TrainerCallback, on_step_begin to
on_step_end); the first step is left out (allocator and kernel warm-up). Reported per run kind,
from the best of its repeats: seconds per optimizer step (median), the ratio framework / TRL
(the target is at most 1.05), trained (non-padding) tokens per second of stepping, and the
whole wall-clock of each run for reference. The framework's non-padding tokens are its
tokens_seen; the TRL script counts the attention mask of its batches. Exits 1 if the padded
runs of A and B saw different token counts (then they did not train the same rows).

--quick: 3 steps, one repeat, 16 rows: checks the script works in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Run:
    kind: str
    step_s: list[float] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens of all steps
    wall_s: float = 0.0

    @property
    def timed(self) -> list[float]:
        return self.step_s[1:] or self.step_s  # the first step warms up

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.timed)

    @property
    def tokens_per_s(self) -> float:
        # tokens of the timed steps, assuming the first step's share is average
        return self.tokens * len(self.timed) / len(self.step_s) / sum(self.timed)


def step_timer(run: Run) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            run.step_s.append(time.perf_counter() - self.start)

    return StepTimer()


def setup(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, list[dict[str, Any]]]:
    from d2lora_dist.config import load_experiment
    from d2lora_dist.data.selection import task_records

    exp = load_experiment(args.experiment, [f"output_dir={tmp}/runs"])
    s = exp.methods["sft"]
    s = replace(s, max_steps=args.steps, min_steps=0, logging_steps=max(args.steps, 1), save_steps=10 ** 6,
                per_device_batch_size=args.per_device_batch_size or s.per_device_batch_size,
                global_batch_size=args.global_batch_size or s.global_batch_size)
    records, _ = task_records(exp, args.task, "sft", args.rows, 0)
    return exp, s, records


def framework_run(exp: Any, settings: Any, records: list[dict[str, Any]], batching: str, tmp: Path,
                  index: int) -> Run:
    from d2lora_dist.train import Phase, train_phase

    run = Run(f"framework-{batching.replace('_', '-')}")
    root = tmp / f"{run.kind}-{index}"
    phase = Phase(name=run.kind, method="sft", settings=replace(settings, batching=batching),
                  settings_key="methods.sft", records=records, out_adapter=root / "adapter",
                  checkpoint_dir=root / "ckpt", seed=0, lineage={"phase": "benchmark"},
                  callbacks=[step_timer(run)])
    start = time.perf_counter()
    outcome = train_phase(exp, phase)
    run.wall_s = time.perf_counter() - start
    run.tokens = outcome.tokens_seen
    return run


def trl_run(exp: Any, settings: Any, records: list[dict[str, Any]], tmp: Path, index: int) -> Run:
    """The plain TRL script: what a user would write from TRL's LoRA SFT example."""
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from d2lora_dist.assets import resolve_asset_uri
    from d2lora_dist.modeling import attention_implementation
    from d2lora_dist.schedule import plan_schedule

    run = Run("trl-padded")
    start = time.perf_counter()
    path = resolve_asset_uri(exp.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, exp.model.dtype),
                                                 attn_implementation=attention_implementation(
                                                     exp.model.attn_implementation))
    s = settings
    accumulation = plan_schedule(s, len(records), 1).gradient_accumulation_steps
    on_gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(tmp / f"trl-{index}"), learning_rate=s.learning_rate, max_steps=s.max_steps,
        per_device_train_batch_size=s.per_device_batch_size, gradient_accumulation_steps=accumulation,
        lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm, max_length=s.max_length, completion_only_loss=True,
        logging_steps=s.logging_steps, save_strategy="no", seed=0, data_seed=0, report_to="none",
        gradient_checkpointing=exp.model.gradient_checkpointing, bf16=on_gpu and torch.cuda.is_bf16_supported(),
        include_num_input_tokens_seen="non_padding", dataset_num_proc=None)
    lora = peft.LoraConfig(r=exp.lora.r, lora_alpha=exp.lora.alpha, lora_dropout=exp.lora.dropout,
                           target_modules=list(exp.lora.target_modules), task_type="CAUSAL_LM", bias="none")
    set_seed(0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, peft_config=lora, callbacks=[step_timer(run)])
    trainer.train()
    trainer.save_model(str(tmp / f"trl-{index}" / "adapter"))
    run.wall_s = time.perf_counter() - start
    run.tokens = int(trainer.state.num_input_tokens_seen)
    return run


def report(best: dict[str, Run], repeats: int) -> int:
    print("\n| run | s / optimizer step (median) | non-padding tokens / s | tokens | wall s (whole run) |")
    print("|---|---|---|---|---|")
    for run in best.values():
        print(f"| {run.kind} | {run.median_step_s:.3f} | {run.tokens_per_s:.0f} | {run.tokens} | {run.wall_s:.1f} |")
    fw, trl, flat = best["framework-padded"], best["trl-padded"], best["framework-padding-free"]
    ratio = fw.median_step_s / trl.median_step_s
    print(f"\nframework / TRL step time (padded, best of {repeats}): {ratio:.3f} (target <= 1.05)")
    print(f"padding-free / padded non-padding tokens per s: {flat.tokens_per_s / fw.tokens_per_s:.2f}")
    if fw.tokens != trl.tokens or fw.tokens != flat.tokens:
        print(f"MISMATCH: the runs saw different non-padding tokens ({fw.tokens}, {trl.tokens}, {flat.tokens})")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(REPO / "launch/experiments/study_cpu.yaml"))
    parser.add_argument("--task", default="titles")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--rows", type=int, default=160, help="task rows drawn by seed 0")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating")
    parser.add_argument("--per-device-batch-size", type=int, default=None, help="default: methods.sft's")
    parser.add_argument("--global-batch-size", type=int, default=None, help="default: methods.sft's")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 repeat, 16 rows: does the script work")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.rows = 3, 1, 16
    import torch

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        exp, settings, records = setup(args, tmp)
        print(f"{len(records)} rows of {args.task}; {settings.max_steps} steps of {settings.global_batch_size} rows "
              f"({settings.per_device_batch_size} per micro-batch), max_length {settings.max_length}; "
              f"{os.cpu_count()} CPUs, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
              flush=True)
        best: dict[str, Run] = {}
        for i in range(args.repeats):
            for kind in ("framework-padded", "trl-padded", "framework-padding-free"):
                run = (trl_run(exp, settings, records, tmp, i) if kind == "trl-padded" else
                       framework_run(exp, settings, records, kind.split("-", 1)[1].replace("-", "_"), tmp, i))
                print(f"[{i}] {run.kind}: steps {', '.join(f'{t:.2f}' for t in run.step_s)} s; "
                      f"{run.tokens} tokens; whole run {run.wall_s:.1f} s", flush=True)
                if run.kind not in best or run.median_step_s < best[run.kind].median_step_s:
                    best[run.kind] = run
    return report(best, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
