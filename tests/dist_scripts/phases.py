"""Multi-rank probe of the training pipeline (launched by tests/test_distributed_*.py).

    accelerate launch --config_file launch/accelerate/cpu_2proc_zero3.yaml \
        tests/dist_scripts/phases.py -c EXP.yaml --out DIR [--warmup] [--phases sft,dpo:base,orpo] [--logits] \
        [--precision]

Runs the library's own entry points (run_warmup, train_phase, load_for_eval) and records,
per rank, into DIR/rank-R.json what the tests assert:
  broadcast    checksum of the warm-up adapter state each rank received, and which files under
               the adapter directory each rank opened (Python audit hook: Python-level opens)
  phases       per phase: first/final loss, steps, trainer.ref_model, adapter names, parameters
               held by this rank (after zero.Init load and inside training), checksum of the
               trained adapter as this rank holds it after training, DDP's find_unused_parameters
               and every process group's timeout at the first step, and (ZeRO-3) the elements
               gathered while writing checkpoints
  eval_params  after leave_zero3: are the evaluation model's parameters whole on every rank?
With --logits, rank 0 also saves the logits of the warm-started model on a fixed batch at the
start of the first phase (inside the training engine, before any update) to DIR/logits.pt.
With --precision, rank 0 saves for every trained phase (the warm-up included) DIR/precision-NAME.pt:
the adapter as the parameters hold it at the start and at the end of training (their own dtype,
bf16 under a bf16 DeepSpeed run) and, under DeepSpeed, the optimizer's fp32 masters at the first
step and at the end (`deepspeed.utils.safe_get_full_fp32_param`), all in PEFT's file naming.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
from pathlib import Path

PHASE_SEED = 0  # every probed phase: its rows and its run
FIXED_TEXTS = ["Sam has 3 apples and buys 4 more. How many now?", "Name a number bigger than 5."]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("-c", "--config", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--warmup", action="store_true", help="run the warm-up first (else it must exist)")
    p.add_argument("--phases", default="", help="comma list of METHOD[:REFERENCE] trained from the warm-up")
    p.add_argument("--n", type=int, default=4, help="task examples per phase")
    p.add_argument("--logits", action="store_true")
    p.add_argument("--precision", action="store_true")
    return p.parse_args()


def watch_opens(directory: Path) -> list[str]:
    """Record every Python-level open of a file below `directory` (sha256, manifest reads)."""
    opened: list[str] = []
    prefix = str(directory.resolve())

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | os.PathLike):
            path = os.path.abspath(os.fspath(args[0]))
            if path.startswith(prefix):
                opened.append(os.path.relpath(path, prefix))

    sys.addaudithook(hook)
    return opened


class Recorder:
    """Captures each trainer the pipeline builds and probes it at the start of training."""

    def __init__(self, want_logits: bool, out: Path, tokenizer, want_precision: bool = False) -> None:
        self.records: list[dict] = []
        self.want_logits = want_logits
        self.want_precision = want_precision
        self.precision: dict = {}
        self.out = out
        self.tokenizer = tokenizer
        self.trainers: list = []

    def wrap_make_trainer(self, train_module) -> None:
        from d2lora_dist.distributed import local_shard_numel

        original = train_module.make_trainer

        def make_trainer(phase, model, args, dataset, tokenizer):
            base = [p for n, p in model.named_parameters() if "lora_" not in n]
            local, full = _numel(base)
            trainer = original(phase, model, args, dataset, tokenizer)
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            self.trainers.append(trainer)
            self.records.append({"phase": phase.name, "ref_model_is_none": trainer.ref_model is None
                                 if hasattr(trainer, "ref_model") else None,
                                 "adapters": sorted(unwrapped.peft_config),
                                 "base_at_load": [local, full],
                                 "trainable_numel": _numel([p for p in model.parameters() if p.requires_grad])[1],
                                 "checkpoints": {"saves": 0, "gathered_numel": 0}})
            self.count_checkpoint_gathers(trainer, self.records[-1]["checkpoints"])
            trainer.add_callback(self.callback(local_shard_numel))
            return trainer

        train_module.make_trainer = make_trainer

    def count_checkpoint_gathers(self, trainer, counts: dict) -> None:
        """Elements ZeRO-3 gathers (GatheredParameters) while the trainer writes a checkpoint."""
        try:
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters
        except ImportError:
            return
        if not hasattr(GatheredParameters, "_probe_saving"):
            enter = GatheredParameters.__enter__

            def counting_enter(context):
                if GatheredParameters._probe_saving is not None and context.enabled:
                    GatheredParameters._probe_saving["gathered_numel"] += sum(p.ds_numel for p in context.params)
                return enter(context)

            GatheredParameters.__enter__ = counting_enter
        GatheredParameters._probe_saving = None
        save = trainer._save_checkpoint

        def counting_save(*args, **kwargs):
            counts["saves"] += 1
            GatheredParameters._probe_saving = counts
            try:
                return save(*args, **kwargs)
            finally:
                GatheredParameters._probe_saving = None

        trainer._save_checkpoint = counting_save

    def callback(self, local_shard_numel):
        from transformers import TrainerCallback

        recorder = self

        class Probe(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                record = recorder.records[-1]
                record["model_in_training"] = list(local_shard_numel(model))
                base = [p for n, p in model.named_parameters() if "lora_" not in n]
                record["base_in_training"] = list(_numel(base))
                if recorder.want_logits and len(recorder.records) == 1:
                    recorder.save_logits(model)
                if recorder.want_precision:  # collective under ZeRO-3: every rank runs it
                    recorder.precision = {"begin_params": _adapter_as_held(model)}

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                # the first step, after every on_train_begin: what the optimizer starts from, how DDP
                # wrapped the model, every process group's timeout
                record = recorder.records[-1]
                if "group_timeouts_s" not in record:
                    wrapped = recorder.trainers[-1].model_wrapped
                    record["find_unused_parameters"] = getattr(wrapped, "find_unused_parameters", None)
                    record["group_timeouts_s"] = _group_timeouts()
                if recorder.want_precision and "begin_master" not in recorder.precision:
                    recorder.precision["begin_master"] = recorder.masters(model)

            def on_train_end(self, args, state, control, model=None, **kwargs):
                if recorder.want_precision:
                    recorder.save_precision(model)

        return Probe()

    def save_precision(self, model) -> None:
        """The end of training as held and as DeepSpeed's fp32 masters, read here with DeepSpeed's
        own API (not the library's path, which the test checks against it)."""
        import torch

        from d2lora_dist import distributed

        end = {"end_params": _adapter_as_held(model), "end_master": self.masters(model)}
        if distributed.is_main_process():
            torch.save({**self.precision, **end}, self.out / f"precision-{self.records[-1]['phase']}.pt")
        self.precision = {}

    @staticmethod
    def masters(model) -> dict:
        """DeepSpeed's fp32 masters of the adapter, read with its own API (collective: all_gather per parameter)."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {n: safe_get_full_fp32_param(p) for n, p in _adapter_params(model)}
        return _peft_names(model, {n: v.detach().cpu().clone() for n, v in masters.items() if v is not None})

    def save_logits(self, model) -> None:
        import torch

        from d2lora_dist import distributed

        batch = self.tokenizer(FIXED_TEXTS, return_tensors="pt", padding=True)
        was_training = model.training
        model.eval()
        with torch.no_grad():  # collective under ZeRO-3: every rank runs it
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        model.train(was_training)
        if distributed.is_main_process():
            torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "logits": logits.detach().cpu()}, self.out / "logits.pt")


def _adapter_params(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n and ".default." in n]


def _adapter_as_held(model) -> dict:
    """The trainable adapter gathered in the parameters' own dtype (collective under ZeRO-3)."""
    from d2lora_dist import distributed

    named = _adapter_params(model)
    with distributed.gathered([p for _, p in named]):
        held = {n: p.detach().to("cpu", copy=True) for n, p in named}
    return _peft_names(model, held)


def _peft_names(model, state: dict) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state, adapter_name="default")


def _group_timeouts() -> list[float]:
    """Seconds of every process group this rank is in (the backends' own setting)."""
    import torch
    from torch.distributed import distributed_c10d as c10d

    return [group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for group in list(c10d._world.pg_map) if not c10d._rank_not_in_group(group)]


def _numel(params) -> tuple[int, int]:
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return local, full


def main() -> int:
    args = parse_args()
    from d2lora_dist import adapters, distributed, train
    from d2lora_dist.config import load_experiment
    from d2lora_dist.data.selection import task_records
    from d2lora_dist.layout import RunLayout
    from d2lora_dist.methods import get_method
    from d2lora_dist.modeling import load_tokenizer
    from d2lora_dist.warmup import run_warmup

    exp = load_experiment(args.config)
    layout = RunLayout(exp.run_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    distributed.init_process_group()
    report: dict = {"rank": distributed.rank(), "world": distributed.world_size(), "mode": distributed.launch_mode()}
    recorder = Recorder(args.logits, args.out, load_tokenizer(exp.model), args.precision)
    recorder.wrap_make_trainer(train)

    if args.warmup:
        run_warmup(exp, layout)
        report["warmup"] = recorder.records[-1]
    opened = watch_opens(layout.warmup_adapter)
    state, _ = adapters.load_adapter_state(layout.warmup_adapter)
    report["broadcast"] = {"checksum": adapters.state_checksum(state), "opened": sorted(set(opened))}

    phases = []
    for spec in filter(None, args.phases.split(",")):
        method, _, reference = spec.partition(":")
        settings = exp.methods[method]
        if reference:
            settings.reference = reference
        records, _ = task_records(exp, "math", get_method(method).form, args.n, PHASE_SEED)
        name = f"{method}-{reference or 'default'}"
        phase = train.Phase(name=name, method=method, settings=settings, settings_key=f"methods.{method}",
                            records=records,
                            out_adapter=args.out / name / "adapter", checkpoint_dir=args.out / name / "ckpt",
                            seed=PHASE_SEED, lineage={"phase": "adapt"}, init_adapter=layout.warmup_adapter)
        outcome = train.train_phase(exp, phase)
        trainer = recorder.trainers[-1]
        trained = adapters.gathered_state_dict(trainer.accelerator.unwrap_model(trainer.model_wrapped))
        phases.append({**recorder.records[-1], "first_loss": outcome.first_loss, "final_loss": outcome.final_loss,
                       "steps": outcome.steps, "max_steps": trainer.state.max_steps,
                       "trained_checksum": adapters.state_checksum(trained),
                       "ln2": math.log(2)})
        recorder.trainers.clear()
    report["phases"] = phases

    if phases:
        from d2lora_dist.evaluate.adapter_eval import load_for_eval

        model, _ = load_for_eval(exp, args.out / phases[-1]["phase"] / "adapter")
        report["eval_params"] = {"zero3_enabled": distributed.zero3_enabled(),
                                 "partitioned": sum(hasattr(p, "ds_id") for p in model.parameters()),
                                 "empty": sum(p.numel() == 0 for p in model.parameters()),
                                 "numel": sum(p.numel() for p in model.parameters())}
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.out / f"rank-{distributed.rank()}.json").write_text(json.dumps(report, indent=2))
    distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
