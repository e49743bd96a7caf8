"""The `d2lora` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from d2lora_dist.evaluate.scoring import SCORERS  # every suite kind rescores; light (no torch)

EXIT_BAD_INPUT = 2


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, type=Path, help="experiment YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set methods.dpo.beta=0.2 (repeatable)")


def _slots(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        slots = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of slots nor auto") from None
    if slots < 1:  # said here: a sweep with nothing left to run plans no slots
        raise argparse.ArgumentTypeError(f"{value!r}: a number of slots is 1 or more")
    return slots


def _load(args: argparse.Namespace):
    from d2lora_dist.config import load_experiment
    from d2lora_dist.layout import RunLayout

    exp = load_experiment(args.config, args.overrides)
    return exp, RunLayout(exp.run_dir)


def _read(args: argparse.Namespace):
    """For commands whose entry runs the preflight: the experiment as far as it builds, and its source,
    which holds its field problems until the preflight reports them with its own in one round."""
    from d2lora_dist.config import read_experiment
    from d2lora_dist.entries import partly_built
    from d2lora_dist.layout import RunLayout

    exp, source = read_experiment(args.config, args.overrides)
    with partly_built(source):  # a broken name or output_dir
        layout = RunLayout(exp.run_dir)
    return exp, layout, source


# ---- handlers -------------------------------------------------------------------------------
def cmd_assets(args: argparse.Namespace) -> int:
    from d2lora_dist import assets
    from d2lora_dist.errors import InputError

    only = args.only or None
    if args.for_experiment is not None:
        import yaml

        try:
            document = yaml.safe_load(args.for_experiment.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"--for {args.for_experiment}: cannot read the experiment file: {e}") from e
        only = [*(only or []), *assets.assets_named_in(document)]
    paths = assets.fetch_all(args.cache_dir, only=only, progress=not args.quiet)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    from d2lora_dist import entries

    exp, layout, source = _read(args)
    return entries.warmup(exp, layout, source, args.warmup)


def cmd_adapt(args: argparse.Namespace) -> int:
    from d2lora_dist import entries
    from d2lora_dist.errors import InputError
    from d2lora_dist.sweep.grid import Cell, per_seed_warmup

    exp, layout, source = _read(args)
    warmup = args.warmup or next(iter(exp.warmup_configs()), "")
    cell = Cell.requested(args.task, args.method, args.init, args.n, args.seed, warmup, args.lora_init,
                          per_seed_warmup(exp, warmup))
    if cell is None:
        raise InputError(f"--init {args.init} --n 0: a {args.init} cell trains, so it has no n = 0 (its untrained "
                         "start is not evaluated); give --n > 0")
    return entries.cell(exp, layout, cell, source)


def cmd_eval(args: argparse.Namespace) -> int:
    from d2lora_dist import entries

    exp, layout, source = _read(args)
    metrics = entries.evaluate(exp, layout, source, args.adapter, args.task, args.suites, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from d2lora_dist.evaluate.scoring import score_file

    metrics = score_file(args.kind, args.predictions)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from d2lora_dist.config import DatasetRef
    from d2lora_dist.data.check import check_dataset, format_check

    columns = dict(c.split("=", 1) for c in args.column)
    ref = DatasetRef(name=args.name, data_files=args.data_files or None, split=args.split, columns=columns,
                     strict=args.strict)
    report = check_dataset(ref)
    print(json.dumps(report, default=str) if args.json else format_check(report))
    return 0


def cmd_sweep_plan(args: argparse.Namespace) -> int:
    from d2lora_dist import entries
    from d2lora_dist.preflight import slurm_problems
    from d2lora_dist.sweep.local import describe_here
    from d2lora_dist.sweep.plan import Throughput, warmup_rows

    exp, layout, source = _read(args)
    speed = Throughput(args.train_tokens_per_s, args.eval_tokens_per_s)
    rows, warmups = entries.plan(exp, layout, source, speed)
    power = None
    if args.power_from is not None:
        from d2lora_dist.report.power import plan_power

        power = plan_power(exp, args.power_from)
    if args.json:
        cells = [r.to_dict() for r in rows]
        print(json.dumps(cells if power is None else {"cells": cells, "power": [p.to_dict() for p in power]},
                         indent=2))
        return 0
    print(f"{exp.name}: {len(rows)} cells, {sum(r.done for r in rows)} done; run dir {layout.root}")
    for w, cost in zip(warmup_rows(exp, layout), warmups, strict=True):
        size = "all rows" if w["m"] is None else f"m = {w['m']}"
        placebo = " (placebo: responses shuffled across prompts)" if w["placebo"] else ""
        print(f"warm-up {w['key']}{placebo}: {w['dataset']}, {size}, seed {w['seed']}, LoRA init {w['lora_init']}; "
              f"{'done' if w['done'] else 'to train'}; {w['cells']} cells start from it; "
              f"{cost.train_examples} train ex., {cost.train_tokens:,} train tokens, {cost.gpu_hours:.2f} GPU-h")
    print(f"GPU-hours at {speed.train:g} training and {speed.eval:g} evaluation tokens per GPU-second "
          "(--train-tokens-per-s, --eval-tokens-per-s); memory per device from launch.strategy's estimate")
    width = max([34, *(len(r.cell.id) + 1 for r in rows)])
    print(f"{'cell':<{width}} {'done':<5} {'launch':<16} {'GiB/GPU':>8} {'train ex.':>10} {'train tokens':>13} "
          f"{'eval tokens':>12} {'GPU-h':>8}")
    for r in rows:
        launch = r.launch.short()
        memory = f"{r.memory_gib:.1f}" if r.memory_gib is not None else "-"
        print(f"{r.cell.id:<{width}} {'yes' if r.done else '-':<5} {launch:<16} {memory:>8} {r.train_examples:>10} "
              f"{r.train_tokens:>13,} {r.eval_tokens:>12,} {r.gpu_hours:>8.2f}")
    from d2lora_dist.sweep.tuning import plan_lines

    for line in plan_lines(exp, [r.cell for r in rows]):
        print(line)
    for method, reason in {r.cell.method: r.launch.describe() for r in rows}.items():
        print(f"launch of {method} cells: {reason}")
    todo = [r for r in rows if not r.done]
    print("the launch column is a Slurm array task's (sweep submit); `sweep run` here: "
          + describe_here(exp, layout, [r.cell for r in todo]))
    for problem in slurm_problems(exp):
        print(f"sweep submit would refuse: {problem}")
    warm = [w for w in warmups if not w.done]
    cell_hours, warm_hours = sum(r.gpu_hours for r in todo), sum(w.gpu_hours for w in warm)
    print(f"warm-ups ({len(warm)} of {len(warmups)} to train): {sum(w.train_tokens for w in warm):,} train tokens, "
          f"{warm_hours:.1f} GPU-hours")
    print(f"total ({len(todo)} cells not done, {len(warm)} warm-up(s) to train): "
          f"{sum(r.train_tokens for r in todo) + sum(w.train_tokens for w in warm):,} train tokens, "
          f"{sum(r.eval_tokens for r in todo):,} eval tokens, {sum(r.eval_items for r in todo):,} eval items, "
          f"{cell_hours + warm_hours:.1f} GPU-hours ({cell_hours:.1f} cells + {warm_hours:.1f} warm-ups)")
    if power is not None:
        from d2lora_dist.report.power import format_power

        print(*format_power(power, args.power_from), sep="\n")
    return 0


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from d2lora_dist import entries

    exp, layout, source = _read(args)
    return entries.run_sweep(exp, layout, source, cell_worker=args.cell_worker, slots=args.slots)


def cmd_sweep_cell(args: argparse.Namespace) -> int:
    from d2lora_dist import entries
    from d2lora_dist.sweep.grid import find_cell
    from d2lora_dist.sweep.plan import cell_at

    exp, layout = _load(args)
    cell = cell_at(layout, args.index) if args.index is not None else find_cell(exp, args.cell)
    return entries.cell(exp, layout, cell, str(args.config), wait=args.if_busy == "wait")


def cmd_sweep_worker(args: argparse.Namespace) -> int:
    from d2lora_dist import entries
    from d2lora_dist.sweep.grid import find_cell

    exp, layout = _load(args)
    cells = None if args.cells_from_stdin else [find_cell(exp, cell_id) for cell_id in args.cells]
    return entries.worker(exp, layout, cells, str(args.config))


def cmd_sweep_submit(args: argparse.Namespace) -> int:
    from d2lora_dist import entries

    exp, layout, source = _read(args)
    result = entries.submit(exp, layout, source, args.dry_run, args.only_failed)
    if not args.dry_run:
        print(result.describe())
    return 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from d2lora_dist.sweep.status import cell_status, format_status_table

    exp, layout = _load(args)
    print(format_status_table(cell_status(exp, layout)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from d2lora_dist.errors import InputError
    from d2lora_dist.report import report, report_from_items

    if args.items is not None:
        if args.config is not None or args.overrides or args.wandb_report or args.out is None:
            raise InputError("report --items FILE rebuilds from that file alone: give --out DIR, and neither "
                             "-c/--config, --set nor --wandb-report")
        report_from_items(args.items, args.out, allow_mixed=args.allow_mixed)
        return 0
    if args.config is None or args.out is not None:
        raise InputError("report needs -c/--config EXPERIMENT (it writes into the run directory's report/), "
                         "or --items FILE --out DIR")
    exp, layout = _load(args)
    report(exp, layout, wandb_report=args.wandb_report, allow_mixed=args.allow_mixed)
    return 0


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from d2lora_dist.inits import INITS  # light registries: the choices are their keys
    from d2lora_dist.methods import METHODS

    parser = argparse.ArgumentParser(prog="d2lora", description="D2LoRA at cluster scale: warm-up, "
                                     "adaptation sweeps, evaluation and reports.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="fetch the offline default model and data into the cache")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $D2LORA_ASSETS or ~/.cache/d2lora_dist")
    p.add_argument("--only", nargs="*", help="asset names to fetch (default: all)")
    p.add_argument("--for", dest="for_experiment", type=Path, metavar="EXP",
                   help="fetch only the assets this experiment file names (asset:NAME values)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("warmup", help="phase 1: LoRA SFT on general data -> the warm-up adapter(s)")
    _experiment_args(p)
    p.add_argument("--warmup", default=None, metavar="KEY",
                   help="one warm-up run: its name under `warmups`, +LORA_INIT when its cells use another than "
                        "the default (e.g. m384+pissa); default: every warm-up run the grid needs, in turn")
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("adapt", help="phase 2 for one cell (train, evaluate, write result.json)")
    _experiment_args(p)
    p.add_argument("--task", required=True)
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--init", required=True, choices=list(INITS))
    p.add_argument("--n", required=True, type=int, help="task examples; 0 trains nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", default=None, help="init d2lora: the warm-up (a name under `warmups`) it starts "
                                                   "from; default: the experiment's first")
    p.add_argument("--lora-init", default="default",
                   help="PEFT's factor init: default, gaussian, pissa, olora, pissa_niter_K")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("eval", help="evaluate the base model or an adapter on suites")
    _experiment_args(p)
    p.add_argument("--adapter", type=Path, default=None, help="adapter artifact dir (default: base model)")
    p.add_argument("--task", default=None, help="task whose suites (and holdout) to use")
    p.add_argument("--suites", nargs="*", help="suite names (default: the task's, else all)")
    p.add_argument("--out", type=Path, default=None, help="predictions directory")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="re-score a predictions JSONL without a model")
    p.add_argument("kind", choices=sorted(SCORERS), help="suite kind of the predictions")
    p.add_argument("predictions", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_score)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="load, normalise and report a registered dataset")
    p.add_argument("name")
    p.add_argument("--data-files", nargs="*", help="local files (json/jsonl/parquet) or a saved dataset dir")
    p.add_argument("--split", default=None)
    p.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN", help="column map entry")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_check)

    sweep = sub.add_parser("sweep", help="the adaptation grid").add_subparsers(dest="sweep_command", required=True)
    p = sweep.add_parser("plan", help="list cells, what is done, the work, launch and GPU-hours per cell")
    _experiment_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--train-tokens-per-s", type=float, default=3000.0, metavar="TOKENS",
                   help="training throughput per GPU the GPU-hours assume (3000: LoRA on an 8B model, bf16, "
                        "A100-class)")
    p.add_argument("--eval-tokens-per-s", type=float, default=1000.0, metavar="TOKENS",
                   help="evaluation throughput per GPU (prompt + generated tokens) the GPU-hours assume")
    p.add_argument("--power-from", type=Path, default=None, metavar="RUN_DIR",
                   help="a finished pilot run directory: print, for the planned seeds and items, the minimum "
                        "detectable effect of each comparison and the seeds report.target_effect needs, from the "
                        "pilot's variance components (with --json: {cells, power})")
    p.set_defaults(func=cmd_sweep_plan)
    p = sweep.add_parser("run", help="run warm-up, every unfinished cell and the report on this machine")
    _experiment_args(p)
    p.add_argument("--cell-worker", action=argparse.BooleanOptionalAction, default=True,
                   help="cells launched as one plain process run in one worker process that loads the base "
                        "model once (default); --no-cell-worker gives every cell a process of its own "
                        "(same results; see docs/choices.md)")
    p.add_argument("--slots", type=_slots, default=None, metavar="N|auto",
                   help="cells run at once: auto (default) = as many as the machine holds (GPUs: groups of the "
                        "GPUs the largest cell needs; CPUs: a share of the cores each, bounded by memory); 1 = one "
                        "after another. On CPUs the adapters are the same either way; on GPUs several slots give each cell "
                        "the launch its Slurm array task would get (docs/choices.md)")
    p.set_defaults(func=cmd_sweep_run)
    p = sweep.add_parser("cell", help="run one cell of the frozen plan (what array tasks call)")
    _experiment_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--index", type=int, help="index into plan.json (SLURM_ARRAY_TASK_ID)")
    group.add_argument("--cell", help="cell id, e.g. math-dpo-d2lora-n1000-s0")
    p.add_argument("--if-busy", choices=["wait", "skip"], default="wait",
                   help="when another process runs the cell: wait for it (default), or skip it at once with exit "
                        "code 3 (what `sweep run` asks, to come back to the cell later)")
    p.set_defaults(func=cmd_sweep_cell)
    p = sweep.add_parser("worker", help="run several cells in this one process on one loaded base model "
                                        "(what `sweep run` calls for cells launched as one plain process)")
    _experiment_args(p)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--cells", nargs="+", metavar="CELL", help="cell ids, run in this order")
    given.add_argument("--cells-from-stdin", action="store_true",
                       help="read cell ids from stdin, one per line, and run each as it arrives (a slot of "
                            "`sweep run`)")
    p.set_defaults(func=cmd_sweep_worker)
    p = sweep.add_parser("submit", help="render sbatch scripts and submit warm-up, array and report jobs")
    _experiment_args(p)
    p.add_argument("--dry-run", action="store_true", help="print scripts and sbatch lines only")
    p.add_argument("--only-failed", action="store_true", help="resubmit only cells that are not done")
    p.set_defaults(func=cmd_sweep_submit)
    p = sweep.add_parser("status", help="cells joined with what Slurm says")
    _experiment_args(p)
    p.set_defaults(func=cmd_sweep_status)

    p = sub.add_parser("report", help="tables, confidence intervals and plots from finished cells, or rebuilt "
                                      "from an items.csv")
    p.add_argument("-c", "--config", type=Path, default=None, help="experiment YAML file (its run directory)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--items", type=Path, default=None, metavar="FILE",
                   help="rebuild the tables from this items.csv alone (written by a report as report/items.csv)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="with --items: where the tables go")
    p.add_argument("--allow-mixed", action="store_true",
                   help="report cells made by different prompt or scorer versions together (marked as mixed) "
                        "instead of refusing")
    p.add_argument("--wandb-report", action="store_true", help="also publish a W&B Report (online only)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from d2lora_dist.errors import InputError
    from d2lora_dist.fileio import no_space_error, no_space_message

    try:
        return args.func(args)
    except InputError as e:
        # Bad input (config, data, adapter, plan, predictions file, asset, a full disk): one clear line, exit 2.
        # Anything else is a bug and keeps its traceback; D2LORA_DEBUG=1 shows this one's too.
        if os.environ.get("D2LORA_DEBUG"):
            raise
        print(f"d2lora: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        full = no_space_error(e)  # a full disk met outside the writes that name their path
        if full is None or os.environ.get("D2LORA_DEBUG"):
            raise
        print(f"d2lora: error: {no_space_message(full.filename, full)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
