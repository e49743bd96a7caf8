"""PiSSA under multi-rank ZeRO-3 (launched by tests/test_lora_inits_zero3.py).

    accelerate launch --config_file launch/accelerate/cpu_2proc_zero3.yaml \
        tests/dist_scripts/lora_inits.py -c EXP.yaml --out DIR

Trains one SFT phase from a fresh PiSSA adapter through train.train_phase (adapter in DIR/sft-pissa/adapter)
and records per rank into DIR/rank-R.json: how often this rank computed residual factors, and, at the
start of training (inside the engine, before any update), checksums of the gathered adapter and of the
gathered residual base weights, and the phase's steps. Rank 0 also saves those residual weights and the
logits of a fixed batch at that moment to DIR/start.pt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEXTS = ["Sam has 3 apples and buys 4 more. How many now?", "Name a number bigger than 5."]
PHASE_SEED = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("-c", "--config", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=8, help="task examples (global batch 4: n / 4 steps)")
    return p.parse_args()


def start_probe(report: dict, out: Path, tokenizer):
    """Collectives under ZeRO-3: every rank runs them at the start of training."""
    import torch
    from transformers import TrainerCallback

    from d2lora_dist import adapters, distributed

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            report["adapter"] = adapters.state_checksum(adapters.gathered_state_dict(model))
            named = [(n, p) for n, p in model.named_parameters() if "base_layer" in n]
            with distributed.gathered([p for _, p in named]):
                residual = {n: p.detach().to("cpu", copy=True) for n, p in named}
            report["residual"] = adapters.state_checksum(residual)
            batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            model.train()
            if distributed.is_main_process():
                torch.save({"residual": residual, "logits": logits.detach().cpu(), "texts": TEXTS}, out / "start.pt")

    return Probe()


def main() -> int:
    args = parse_args()
    from d2lora_dist import distributed, residual, train
    from d2lora_dist.config import load_experiment
    from d2lora_dist.data.selection import task_records
    from d2lora_dist.modeling import load_tokenizer

    exp = load_experiment(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    distributed.init_process_group()
    report: dict = {"rank": distributed.rank(), "world": distributed.world_size(), "computed": 0}
    compute = residual.compute_factors

    def counted(*a):
        report["computed"] += 1
        return compute(*a)

    residual.compute_factors = counted
    records, _ = task_records(exp, "math", "sft", args.n, PHASE_SEED)
    phase = train.Phase(name="sft-pissa", method="sft", settings=exp.methods["sft"], settings_key="methods.sft",
                        records=records, out_adapter=args.out / "sft-pissa" / "adapter",
                        checkpoint_dir=args.out / "sft-pissa" / "ckpt", seed=PHASE_SEED, lineage={"phase": "adapt"},
                        lora_init="pissa", callbacks=[start_probe(report, args.out, load_tokenizer(exp.model))])
    outcome = train.train_phase(exp, phase)
    report["steps"] = outcome.steps
    report["final_loss"] = outcome.final_loss
    (args.out / f"rank-{distributed.rank()}.json").write_text(json.dumps(report, indent=2))
    distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
