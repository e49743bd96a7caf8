"""Per-rank memory of the warm-up (LoRA SFT) on SmolLM2: 1 rank vs 2-rank DDP vs 2-rank ZeRO-3.

    .venv/bin/python benchmarks/memory_ranks.py [--model asset:smollm2] [--steps 3] [--out DIR]

Runs the real `d2lora warmup` four times, side by side in one invocation (one plain process;
`accelerate launch` with launch/accelerate/cpu_2proc_zero3.yaml and --num_processes 1, i.e. the
DeepSpeed engine without sharding; cpu_2proc_ddp.yaml; cpu_2proc_zero3.yaml), a few SFT steps
each on the CPU demo's data, and prints one table with ratios to the plain 1-rank run:

  base params held     parameters of the base model this rank holds once training started
                       (ZeRO-3: its partition; DDP and 1 rank: all of them)
  peak RSS loading     highest resident memory (sampled every 20 ms) until training starts
  peak RSS training    highest resident memory from the first to the last training step
  RSS after training   resident memory after the last step
  peak RSS (process)   the process's high-water mark (getrusage)

Each launch runs this file in --worker mode, which wraps the library's trainer factory with
a probe callback and then calls `d2lora_dist.cli.main` unchanged. Numbers for docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "launch" / "experiments" / "demo_cpu.yaml"
# "1-rank ZeRO-3" is the DeepSpeed engine's own cost without sharding (same config, 1 process)
RUNS = [("1 rank", None), ("1-rank ZeRO-3", "cpu_2proc_zero3.yaml"), ("2-rank DDP", "cpu_2proc_ddp.yaml"),
        ("2-rank ZeRO-3", "cpu_2proc_zero3.yaml")]


# ---- worker: one rank of one launch -------------------------------------------------------------
def worker(out: Path, cli_args: list[str]) -> int:
    import threading

    import psutil

    from d2lora_dist import cli, distributed, train

    probe: dict = {"peak_rss_load_mb": 0.0, "peak_rss_train_mb": 0.0}
    phase = ["load"]
    stop = threading.Event()

    def sample() -> None:  # resident memory every 20 ms, attributed to loading or training
        me = psutil.Process()
        while not stop.is_set():
            key = {"load": "peak_rss_load_mb", "train": "peak_rss_train_mb"}.get(phase[0])
            if key:
                probe[key] = max(probe[key], me.memory_info().rss / 2**20)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    original = train.make_trainer

    def make_trainer(*args, **kwargs):
        from transformers import TrainerCallback

        trainer = original(*args, **kwargs)

        class Probe(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                base = [p for n, p in model.named_parameters() if "lora_" not in n]
                probe["base_local"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in base)
                probe["base_full"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in base)
                probe["rss_train_start_mb"] = psutil.Process().memory_info().rss / 2**20
                probe["t_start"] = time.time()
                phase[0] = "train"

            def on_train_end(self, args, state, control, **kw):
                phase[0] = "done"
                probe["rss_train_end_mb"] = psutil.Process().memory_info().rss / 2**20
                probe["steps"] = state.global_step
                probe["train_s"] = time.time() - probe["t_start"]

        trainer.add_callback(Probe())
        return trainer

    train.make_trainer = make_trainer
    code = cli.main(cli_args)
    stop.set()
    probe["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    probe["rank"], probe["world"] = distributed.rank(), distributed.world_size()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{probe['rank']}.json").write_text(json.dumps(probe, indent=2))
    return code


# ---- orchestrator -------------------------------------------------------------------------------
def launch_one(label: str, config: str | None, cli_args: list[str], out: Path, env: dict,
               extra: list[str]) -> list[dict]:
    worker_cmd = [str(Path(__file__).resolve()), "--worker", str(out), "--", *cli_args]
    if config is None:
        command = [sys.executable, *worker_cmd]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "launch" / "accelerate" / config), "--main_process_port", "0", *extra, *worker_cmd]
    print(f"--- {label}: {' '.join(command)}", flush=True)
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    with log.open("w") as fh:
        code = subprocess.call(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{label} failed (exit {code}); see {log}")
    print(f"    done in {time.time() - start:.0f}s", flush=True)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def table(results: dict[str, list[dict]]) -> str:
    one = results["1 rank"][0] if "1 rank" in results else next(iter(results.values()))[0]
    rows = ["| run | rank | base params held | peak RSS loading | peak RSS training | RSS after training | "
            "peak RSS (process) | training / 1 rank | process / 1 rank | steps, train s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for label, ranks in results.items():
        for r in ranks:
            rows.append(f"| {label} | {r['rank']} | {r['base_local'] / 1e6:.1f}M "
                        f"({r['base_local'] / r['base_full']:.0%}) | {r['peak_rss_load_mb']:.0f} MiB | "
                        f"{r['peak_rss_train_mb']:.0f} MiB | {r['rss_train_end_mb']:.0f} MiB | "
                        f"{r['peak_rss_mb']:.0f} MiB | {r['peak_rss_train_mb'] / one['peak_rss_train_mb']:.2f} | "
                        f"{r['peak_rss_mb'] / one['peak_rss_mb']:.2f} | {r['steps']}, {r['train_s']:.0f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="asset:smollm2", help="model.name_or_path (default: SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=3, help="SFT steps per run")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="keep logs and per-rank JSON here")
    parser.add_argument("--zero3-config", default=None,
                        help="DeepSpeed JSON for the ZeRO-3 run (default: the accelerate config's, "
                             "ds_configs/zero3_cpu_test.json)")
    parser.add_argument("--only", action="append", choices=[label for label, _ in RUNS],
                        help="run only these (repeatable); the ratio column needs '1 rank'")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker is not None:
        return worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)

    out = args.out or Path(tempfile.mkdtemp(prefix="memory_ranks-"))
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "TRL_EXPERIMENTAL_SILENCE": "1"}
    results = {}
    for label, config in RUNS:
        if args.only and label not in args.only:
            continue
        slug = label.replace(" ", "_").replace("-", "")
        # 2 rows per step on each rank: the same per-rank batch in every run
        cli_args = ["warmup", "-c", str(EXPERIMENT), "--set", f"output_dir={out / slug / 'runs'}",
                    "--set", f"model.name_or_path={args.model}", "--set", "tracking.mode=disabled",
                    "--set", f"warmup.n={4 * args.steps}", "--set", f"warmup.train.max_steps={args.steps}",
                    "--set", "warmup.train.per_device_batch_size=2",
                    "--set", "warmup.train.global_batch_size=4",
                    "--set", f"warmup.train.max_length={args.max_length}", "--set", "warmup.train.save_steps=1000",
                    "--set", "warmup.train.logging_steps=1"]
        extra = ["--deepspeed_config_file", args.zero3_config] if args.zero3_config and "ZeRO" in label else []
        extra += ["--num_processes", "1"] if label == "1-rank ZeRO-3" else []
        results[label] = launch_one(label, config, cli_args, out / slug, env, extra)
    print(f"\nper-rank memory, {args.model}, {args.steps} SFT steps of 2 x {args.max_length} tokens per rank, "
          f"float32 on CPU (logs: {out})\n")
    print(table(results))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
