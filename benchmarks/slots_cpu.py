"""Why `sweep run --slots auto` splits a CPU machine: work done per second by one process using every core
against N processes at once, each on its share of the cores, for the two kinds of work a cell does.

    .venv/bin/python benchmarks/slots_cpu.py                 # SmolLM2 from the assets, 2 slots
    .venv/bin/python benchmarks/slots_cpu.py --slots 4 --new-tokens 32

Each job loads the base model and runs, timed after a warm-up, (a) greedy decoding of the first GSM8K
prompts of the demo (`--prompts` at a time, `--new-tokens` long, the evaluation's generation loop) and
(b) forward + backward passes on a batch of `--rows` x `--length` tokens (a training step's compute).
"One process" runs one job with every core; "N slots" runs N jobs at once with cores / N threads each.
Throughput ratio = (N jobs / their wall time) / (1 job / its wall time): above 1, the slots get more done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from d2lora_dist.config import load_experiment
    from d2lora_dist.data.selection import suite_items
    from d2lora_dist.evaluate.generation import generate
    from d2lora_dist.evaluate.suites import gsm8k_prompt
    from d2lora_dist.modeling import load_base_model, load_tokenizer

    exp = load_experiment(args.experiment)
    tokenizer, model = load_tokenizer(exp.model), load_base_model(exp.model, training=False).eval()
    prompts = [gsm8k_prompt(item, tokenizer) for item in suite_items(exp, "gsm8k", "math")[:args.prompts]]
    generate(model, tokenizer, prompts[:2], 4, args.prompts, progress=False)  # warm-up
    start = time.time()
    generate(model, tokenizer, prompts, args.new_tokens, args.prompts, progress=False)
    decode = time.time() - start
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # so that backward runs through every layer
    ids = torch.randint(0, 1000, (args.rows, args.length), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    start = time.time()
    for _ in range(args.steps):
        model(input_ids=ids, labels=ids).loss.backward()
    return {"decode_s": decode, "train_s": time.time() - start, "threads": torch.get_num_threads()}


def run_jobs(count: int, threads: int, argv: list[str]) -> tuple[float, list[dict[str, float]]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--job", *argv], env=env, stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(count)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a job failed")
    return time.time() - start, outs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(REPO / "benchmarks/inputs/demo_cpu_v1.yaml"))
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job(args)))
        return 0
    argv = [f"--experiment={args.experiment}", f"--prompts={args.prompts}", f"--new-tokens={args.new_tokens}",
            f"--rows={args.rows}", f"--length={args.length}", f"--steps={args.steps}"]
    cores = len(os.sched_getaffinity(0))
    _, (alone,) = run_jobs(1, cores, argv)
    _, together = run_jobs(args.slots, max(1, cores // args.slots), argv)
    print("| run | threads per process | decode s (per job) | train s (per job) |\n|---|---:|---:|---:|")
    print(f"| one process | {alone['threads']} | {alone['decode_s']:.1f} | {alone['train_s']:.1f} |")
    for i, out in enumerate(together):
        print(f"| slot {i} of {args.slots} at once | {out['threads']} | {out['decode_s']:.1f} | {out['train_s']:.1f} |")
    for part in ("decode", "train"):
        ratio = args.slots / max(o[f"{part}_s"] for o in together) / (1 / alone[f"{part}_s"])
        print(f"{part}: {args.slots} slots / one process, work per second = {ratio:.2f}")
    print(f"machine: {cores} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
