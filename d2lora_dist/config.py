"""The experiment file: typed schema, `--set a.b=c` overrides and cross-field validation.

Every hyper-parameter lives here and in the experiment file; the rest of the code reads
these objects and has no defaults of its own. Field docs are the `help` metadata.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml

from d2lora_dist.config_source import ConfigSource, dotted_key, key_lines, key_parts
from d2lora_dist.inits import INITS
from d2lora_dist.lora_inits import DEFAULT_LORA_INIT, is_lora_init, lora_init_spec
from d2lora_dist.methods import METHODS
from d2lora_dist.schema import ConfigError, build, to_dict

SINGLE_WARMUP = "warmup"  # the name of an experiment's one `warmup` section
VANILLA_GROUP = "vanilla"  # the Slurm array of cells that start from no warm-up; no warm-up may take the name
_WARMUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")  # part of cell ids and directory names


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _help("Hub id, local HF directory, or asset:smollm2 for the offline default.")
    dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "Weights dtype. bfloat16 halves memory on GPUs; CPUs need float32.", default="bfloat16")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _help(
        "auto = flash_attention_2 when installed and on CUDA, else sdpa. The choice is logged.",
        default="auto")
    gradient_checkpointing: bool = _help(
        "Recompute activations in backward: less memory, about 30% slower.", default=False)


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank; higher = more trainable parameters and memory.", default=16)
    alpha: int = _help("LoRA scaling numerator (scale = alpha / r).", default=16)
    dropout: float = _help(
        "Dropout on the LoRA input, in every phase unless the phase's `lora_dropout` says otherwise "
        "(preference methods included: TRL's own default would switch it off silently).", default=0.05)
    target_modules: list[str] = _help(
        "Module names that get adapters.",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class DatasetRef:
    name: str = _help("Registered dataset name (see `d2lora data check --help`).")
    data_files: list[str] | str | None = _help(
        "Local json/jsonl/parquet files or one saved HF dataset dir, instead of the hub "
        "(asset:NAME paths point into the offline cache).", default=None)
    split: str | None = _help("Split to read; default: the registry's.", default=None)
    columns: dict[str, str] = _help(
        "Rename map: schema field -> column in this dataset (e.g. {title: paper_title}).",
        default_factory=dict)
    strict: bool = _help("Stop at the first bad row instead of skipping and reporting it.", default=False)


@dataclass
class TrainSettings:
    learning_rate: float = _help("Peak learning rate.")
    epochs: float = _help("Passes over the training set (ignored when max_steps > 0).")
    global_batch_size: int = _help(
        "Examples per optimizer step over all ranks. Gradient accumulation is derived from it: "
        "global / (per_device_batch_size x world size), which must divide exactly; so the same file "
        "takes the same optimizer steps on 1, 4 or 8 GPUs.")
    per_device_batch_size: int = _help("Micro-batch per rank; higher uses more memory.", default=1)
    max_steps: int = _help("Optimizer steps; -1 = derive from epochs.", default=-1)
    min_steps: int = _help(
        "Guarantee at least this many optimizer steps: when epochs x ceil(n / global_batch_size) is "
        "smaller, the data is repeated (more epochs). 0 = epochs decide.", default=0)
    lr_scheduler: str = _help("transformers scheduler name.", default="linear")
    warmup_ratio: float = _help("Fraction of steps with linear LR warm-up.", default=0.0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    max_length: int = _help("Max tokens of prompt + response; longer rows are truncated.", default=1024)
    batching: Literal["auto", "padded", "padding_free"] = _help(
        "How a micro-batch's rows are laid out. padded = each row padded to the longest; padding_free = the "
        "rows joined into one sequence whose positions restart per row, so no padding token is computed "
        "(the same loss; SFT only, with flash_attention_2, sdpa or eager attention); auto = padding_free "
        "where it is correct and a micro-batch has more than one row, else padded. The choice that ran is "
        "in the manifest. See docs/choices.md.", default="auto")
    beta: float | None = _help("DPO/ORPO/KTO beta (required for those methods).", default=None)
    preference_target: Literal["step", "full"] = _help(
        "Step-wise preference rows (Math-Step-DPO): the shared initial steps are always on the prompt "
        "side (a continued assistant turn); step = chosen/rejected are the one next step (Step-DPO), "
        "full = the whole remaining solution to its final answer (full_chosen/full_rejected). Other "
        "preference data has no steps and ignores it. See docs/preference-targets.md.", default="full")
    lora_dropout: float | None = _help("LoRA dropout in this phase; null = lora.dropout.", default=None)
    reference: Literal["init", "base"] = _help(
        "DPO reference policy: init = the starting policy (the warm-up adapter for D2LoRA), "
        "base = the base model with adapters disabled.", default="init")
    logging_steps: int = _help("Log every k optimizer steps.", default=10)
    save_steps: int = _help("Checkpoint every k optimizer steps (for resuming).", default=100)


@dataclass
class WarmupConfig:
    dataset: DatasetRef = _help("General SFT data (the paper: orpo-dpo-mix-40k chosen answers).")
    train: TrainSettings = _help("Warm-up optimisation settings (paper: lr 1e-7, 1 epoch).")
    n: int | None = _help("Use the first n rows of the seeded permutation; null = all.", default=None)
    seed: int = _help("The warm-up's seed: its data order, fresh LoRA init and dropout.", default=0)
    seeds: Literal["single", "per_cell"] = _help(
        "single = one warm-up (of `seed`) that every D2LoRA cell starts from: one warm-up draw; per_cell = one "
        "warm-up per cell seed s (seed s: its own data order, LoRA init and dropout), which the cells of seed s "
        "start from, so D2LoRA's seed-to-seed spread includes the warm-up's own. See docs/choices.md.",
        default="single")


@dataclass
class TaskConfig:
    dataset: DatasetRef = _help("Task data; SFT and preference methods read it through the registry.")
    suites: list[str] = _help("Evaluation suites: the task metric first, then forgetting suites.")
    holdout: int = _help("Rows reserved for evaluation and never trained on (titles: 100).", default=0)
    validation: int = _help(
        "Rows of the training pool held out as a validation split (seeded by data_seed, the same for every "
        "cell, never trained on, disjoint from the holdout): what `split: validation` suites evaluate and "
        "a grid block's `tune` chooses its settings on. 0 = none.", default=0)

    def role(self, suite: str) -> str:
        """The one rule of suite roles: a task's first suite is its task metric, the rest measure forgetting."""
        return "task" if self.suites and suite == self.suites[0] else "forgetting"

    def roles(self) -> dict[str, str]:
        return {suite: self.role(suite) for suite in self.suites}


@dataclass
class SuiteConfig:
    kind: str = _help("Metric family of the suite (d2lora_dist.evaluate.suites.SUITES: gsm8k, titles, arc).")
    dataset: DatasetRef | None = _help("Evaluation data; null = the task's holdout rows.", default=None)
    limit: int | None = _help("Evaluate only the first k items (null = all).", default=None)
    split: Literal["test", "validation"] = _help(
        "test = the suite's dataset or the task's holdout; validation = the task's validation rows "
        "(tasks.<name>.validation; dataset must be null), with this suite's own limit.", default="test")
    batch_size: int = _help("Prompts per generation / scoring batch per rank.", default=8)
    max_new_tokens: int = _help("Generation budget (gsm8k, titles).", default=256)
    answer_filter: Literal["strict", "flexible"] = _help(
        "gsm8k: which answer filter's accuracy is the headline `accuracy` (both are always reported as "
        "strict_accuracy and flexible_accuracy; see docs/evaluation.md).", default="flexible")


@dataclass
class TuneConfig:
    """Hyper-parameter axes a grid block chooses per arm on the validation split (sweep/tuning.py)."""

    suite: str = _help("The suite (split: validation) whose metric chooses the setting.")
    learning_rate: list[float] | None = _help("Learning rates to try (null = the method's own).", default=None)
    epochs: list[float] | None = _help("Epochs to try (null = the method's own).", default=None)
    min_steps: list[int] | None = _help("min_steps values to try (null = the method's own).", default=None)
    seeds: list[int] = _help("Seeds each setting is trained on for the choice (their mean decides).",
                             default_factory=lambda: [0])
    metric: str | None = _help("Metric of the suite that decides (higher is better); null = the suite kind's "
                               "headline (accuracy, rougeL).", default=None)


@dataclass
class GridBlock:
    task: str = _help("Task name (a key of `tasks`).")
    methods: list[str] = _help("Adaptation methods (names of d2lora_dist.methods.METHODS: sft, dpo, orpo, kto).")
    n: list[int] = _help("Task-example counts; 0 = no task training.")
    inits: list[str] = _help("Initialisations (d2lora_dist.inits.INITS): lora = fresh adapter, d2lora = start "
                             "from the warm-up adapter.",
                              default_factory=lambda: ["lora", "d2lora"])
    seeds: list[int] = _help("Training seeds.", default_factory=lambda: [0])
    suites: list[str] | None = _help(
        "Suites these cells evaluate: a subset of the task's that keeps its task metric (null = all of the "
        "task's). Lets a costly forgetting suite run at a few n only; a cell in several blocks runs the union.",
        default=None)
    warmups: list[str] | None = _help(
        "The warm-ups (names under `warmups`) the D2LoRA cells of this block start from, one cell each "
        "(null = every warm-up of the experiment). Vanilla cells start from none.", default=None)
    lora_inits: list[str] = _help(
        "How a fresh adapter's factors are drawn (d2lora_dist.lora_inits: default, gaussian, pissa, olora, "
        "pissa_niter_K), one cell each. A D2LoRA cell starts from a warm-up that began with the same one.",
        default_factory=lambda: [DEFAULT_LORA_INIT])
    tune: TuneConfig | None = _help(
        "Choose each arm's learning rate / epochs / min_steps on the validation split: every setting is trained "
        "on tune.seeds and scored on tune.suite, then the best (docs/choices.md) runs on `seeds` and the test "
        "suites. null = the method's settings as they are.", default=None)


@dataclass
class ModelShapeConfig:
    """The values of the model's config.json that the memory estimate reads."""

    hidden_size: int = _help("Width of the residual stream.")
    num_hidden_layers: int = _help("Decoder layers.")
    vocab_size: int = _help("Vocabulary (the logits' width).")
    num_attention_heads: int = _help("Query heads.")
    intermediate_size: int = _help("MLP width.")
    num_key_value_heads: int | None = _help("Key/value heads (null = num_attention_heads).", default=None)
    head_dim: int | None = _help("Per-head width (null = hidden_size / num_attention_heads).", default=None)
    tie_word_embeddings: bool = _help("LM head shares the embedding matrix.", default=False)


@dataclass
class LaunchConfig:
    accelerate_config: str | None = _help(
        "accelerate config file for `accelerate launch` (null = one plain process, or what `strategy` "
        "chooses).", default=None)
    num_processes: int = _help("Ranks per node (with a strategy: the most GPUs one cell may use).", default=1)
    deepspeed_config: str | None = _help("DeepSpeed JSON (ZeRO stage, offload).", default=None)
    main_process_port: int = _help("Rendezvous port; 0 = pick a free one.", default=0)
    strategy: Literal["auto", "ddp", "zero2", "zero3", "zero3_offload"] | None = _help(
        "How ranks share the model: auto = the fastest of ddp > zero2 > zero3 > zero3_offload whose memory "
        "estimate fits gpu_memory_gib, on the fewest GPUs; a name = that one (an error if it cannot fit). "
        "null = the named accelerate_config / deepspeed_config as they are, or auto when none is named. "
        "See docs/performance.md.", default=None)
    gpu_memory_gib: float = _help("Memory of one GPU, for the strategy choice (an H100/A100 has 80).",
                                  default=80.0)
    model_shape: ModelShapeConfig | None = _help(
        "The model's dimensions for the memory estimate when its config.json is not on this machine and "
        "its shape is not built in (d2lora_dist.memory_estimate.KNOWN_SHAPES).", default=None)


@dataclass
class TrackingConfig:
    project: str = _help("W&B project (WANDB_PROJECT overrides).", default="d2lora")
    entity: str | None = _help("W&B entity (WANDB_ENTITY overrides).", default=None)
    mode: Literal["auto", "online", "offline", "disabled"] = _help(
        "auto = online with credentials, else offline into the run directory.", default="auto")


@dataclass
class SlurmReportConfig:
    """The report job: tables and plots on CPUs, so it asks for little and for no GPU (not the cells' node)."""

    partition: str | None = _help("Partition of the report job; null = the cluster's default partition (the "
                                  "GPU partition of slurm.partition is not asked for a CPU-only step).",
                                  default=None)
    cpus_per_task: int = _help("CPUs of the report job.", default=2)
    mem: str = _help("Memory of the report job (Slurm's --mem: 8G, 16000M).", default="8G")
    time: str = _help("Time limit of the report job.", default="01:00:00")
    extra_sbatch: list[str] = _help(
        "Extra `#SBATCH` lines of the report job, verbatim (slurm.extra_sbatch is not repeated here: its lines "
        "often ask for GPUs or a whole node).", default_factory=list)


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = _help("Nodes for the warm-up job (cells use one node).", default=1)
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str = "04:00:00"
    constraint: str | None = None
    max_parallel: int = _help("Array throttle: cells running at once.", default=8)
    whole_node: bool = _help(
        "Give every cell a whole node (gpus_per_node GPUs, launch.num_processes ranks). false = a cell asks "
        "for the GPUs its memory estimate needs (with cpus_per_task and mem scaled to that share), so "
        "array tasks share nodes. Named accelerate/deepspeed configs without a strategy always take "
        "whole nodes.", default=False)
    signal_seconds: int = _help("Seconds before the time limit when USR1 asks to checkpoint.", default=300)
    extra_sbatch: list[str] = _help("Extra `#SBATCH` lines, verbatim.", default_factory=list)
    setup: list[str] = _help("Shell lines run before the job (module load, venv activate).",
                             default_factory=list)
    report: SlurmReportConfig = _help("The report job's own, modest resources (the other keys size the warm-up "
                                      "and the cells; account, qos and setup are shared).",
                                      default_factory=SlurmReportConfig)


@dataclass
class PrimaryComparison:
    task: str = _help("Task name (a key of `tasks`).")
    method: str = _help("Method of the cells compared (sft, dpo, orpo, kto; `none` for n = 0).")
    n: int = _help("Task-example count of the cells compared.")
    metric: str = _help("Metric of the suite, e.g. rougeL or accuracy.")
    suite: str | None = _help("Suite of the metric; null = the task's task suite (its first).", default=None)
    warmup: str | None = _help("Warm-up of the D2LoRA arm (a name under `warmups`); null = the one warm-up.",
                               default=None)
    lora_init: str = _help("LoRA init of both arms (grid `lora_inits`).", default=DEFAULT_LORA_INIT)


@dataclass
class ReportConfig:
    """How the report judges Δ = D2LoRA − LoRA (docs/statistics.md)."""

    min_seeds: int = _help(
        "Paired seeds a trained Δ needs before it can be called resolved; fewer show their interval and "
        "'too few seeds to resolve (k of min_seeds)'. Below 5 the t interval over seeds is itself liberal.",
        default=5)
    primary: list[PrimaryComparison] = _help(
        "The comparison(s) the experiment is run to answer, each tested at 95%. Every other Δ is exploratory: "
        "resolved only after Holm's correction over the Δs of its table.", default_factory=list)
    target_effect: dict[str, float] = _help(
        "The Δ, in points, the report sizes the study for (how many seeds would detect it at 80% power), by "
        "suite kind.", default_factory=lambda: {"titles": 2.0, "gsm8k": 1.0, "arc": 1.0})
    budget_ratio: float = _help(
        "A Δ whose arms differ in total optimisation budget (phase + warm-up optimizer steps, or summed "
        "learning rate) by more than this factor is marked in the tables, with the budgets that differ "
        "(docs/statistics.md).", default=1.5)


@dataclass
class Experiment:
    name: str = _help("Experiment name: run directory and W&B group.")
    model: ModelConfig = _help("Base model.")
    tasks: dict[str, TaskConfig] = _help("Task name -> data and suites.")
    suites: dict[str, SuiteConfig] = _help("Suite name -> evaluation settings.")
    methods: dict[str, TrainSettings] = _help("Method name (a key of d2lora_dist.methods.METHODS) -> phase-2 "
                                              "settings.")
    grid: list[GridBlock] = _help("Cells to run: the union of the blocks' products.")
    output_dir: str = _help("Runs live in output_dir/name.", default="runs")
    data_seed: int = _help(
        "Seed of the evaluation holdout (the same rows for every cell) and, mixed with each cell's seed, "
        "of the training permutation that that seed's nested n-subsets take prefixes of.", default=1234)
    update_warning_below: float = _help(
        "A phase whose largest per-layer update |dW| / |W| stays below this is reported as too small "
        "to change the model's outputs (bf16 resolves about 4e-3 relative).", default=1e-3)
    lora: LoraConfig = _help("Adapter shape (shared by warm-up and every cell).",
                             default_factory=LoraConfig)
    warmup: WarmupConfig | None = _help("Phase 1; required when any cell uses init d2lora (or `warmups`).",
                                        default=None)
    warmups: dict[str, WarmupConfig] | None = _help(
        "Several named warm-ups instead of one `warmup` (e.g. sizes m of the paper's D2LoRA(m, n)); each is "
        "trained once, per LoRA init its cells use. Names: lower-case letters, digits and _.", default=None)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def warmup_configs(self) -> dict[str, WarmupConfig]:
        """Every warm-up by name; a single `warmup` section is the warm-up named "warmup"."""
        if self.warmups:
            return dict(self.warmups)
        return {SINGLE_WARMUP: self.warmup} if self.warmup is not None else {}

    def warmup_settings_key(self, name: str) -> str:
        """Where the warm-up's settings live in the experiment file, for messages."""
        return f"warmups.{name}" if self.warmups else "warmup"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides (values parsed as YAML) to a copy of the raw config; `grid[0].n=[4]` (or
    `grid.0.n=[4]`) sets a key of one list item."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected KEY=VALUE, e.g. methods.dpo.beta=0.2"], "--set")
        dotted, raw = item.split("=", 1)
        parts = key_parts(dotted)
        if not parts or isinstance(parts[-1], int):
            raise ConfigError([f"--set {item}: {dotted!r} does not end in a key name (e.g. grid[0].n=[4])"], "--set")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError([f"--set {item}: the value is not valid YAML ({_yaml_problem(e)})"], "--set") from e
        _parent_of(data, parts, item)[parts[-1]] = value
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint and its column, without the echo of the text."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None:
        return " ".join(str(e).split())
    return f"{problem} at column {mark.column + 1}" if mark is not None else problem


def _parent_of(data: dict[str, Any], parts: list[str | int], item: str) -> dict[str, Any]:
    """The mapping that holds the last key of `parts`; missing mappings on the way are made."""
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        _refuse_step(node, part, parts[:depth], item)
        if isinstance(part, str) and node.get(part) is None:
            node[part] = {}
        node = node[part]
    _refuse_step(node, parts[-1], parts[:-1], item)
    return node


def _refuse_step(node: Any, part: str | int, above: list[str | int], item: str) -> None:
    """Refuse `part` where `node` (the value at `above`) cannot hold it."""
    where = dotted_key(above) or "the top level"
    if isinstance(part, int) and not isinstance(node, list):
        problem = f"{where} is not a list"
    elif isinstance(part, int) and not 0 <= part < len(node):
        problem = f"{where} has {len(node)} entries, no [{part}]"
    elif isinstance(part, str) and isinstance(node, list):
        problem = f"{where} is a list: name an entry, e.g. {where}[0].{part}"
    elif isinstance(part, str) and not isinstance(node, dict):
        problem = f"{where} is not a mapping"
    else:
        return
    raise ConfigError([f"--set {item}: {problem}"], "--set")


# Settings added after run directories were frozen without them: the value those runs used, where it
# is not today's default. A frozen file read by its jobs, and compared with a new request, gets these.
RAN_BEFORE_THE_SETTING = {"batching": "padded"}


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override, type-check and cross-validate an experiment file (a run directory's frozen file
    as its runs ran: settings newer than the file read as RAN_BEFORE_THE_SETTING says)."""
    exp, source = read_experiment(path, overrides)
    if source.problems:
        raise ConfigError(list(source.problems), source)
    return exp


def read_experiment(path: str | Path, overrides: list[str] | None = None) -> tuple[Experiment, ConfigSource]:
    """As load_experiment, but field problems do not raise: they travel in the source (with the line or
    `--set` argument of every key), so that the preflight reports them in one round with its own.
    The experiment is built as far as it can be; a file that is missing or not YAML still raises."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"experiment file not found: {path}"], str(path))
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from e
    if path.name == "experiment.yaml" and (path.parent / "plan.json").is_file():
        raw = in_its_place(as_frozen_runs_ran(raw), path)
    where = {dotted_key(key_parts(item.split("=", 1)[0])): f"--set {item}" for item in overrides or [] if "=" in item}
    source = ConfigSource(str(path), key_lines(text), where)
    exp, problems = build(Experiment, apply_overrides(raw, overrides or []), str(path))
    problems += validate(exp, well_typed=not problems)
    return exp, replace(source, problems=tuple(problems))


def in_its_place(raw: Any, frozen_file: Path) -> Any:
    """A run directory is where it is: the output_dir its frozen file records (where it was frozen) gives way
    to the folder that holds it, so that a run directory copied or moved elsewhere runs, continues and reports
    there, and never writes into the place it came from. (A run directory renamed away from its experiment's
    name keeps the recorded output_dir.)"""
    if not isinstance(raw, dict) or raw.get("name") != frozen_file.parent.name:
        return raw
    return {**raw, "output_dir": str(frozen_file.parent.parent.resolve())}


def as_frozen_runs_ran(raw: dict[str, Any]) -> dict[str, Any]:
    """A frozen file with the settings it predates filled in as its runs ran them (every phase's settings)."""
    raw = copy.deepcopy(raw)
    phases = [*(raw.get("methods") or {}).values(), (raw.get("warmup") or {}).get("train"),
              *((w or {}).get("train") for w in (raw.get("warmups") or {}).values())]
    for settings in phases:
        if isinstance(settings, dict):
            for key, value in RAN_BEFORE_THE_SETTING.items():
                settings.setdefault(key, value)
    return raw


def experiment_from_dict(data: dict[str, Any], source: str = "<dict>") -> Experiment:
    """Type-check, then cross-validate; every problem of both stages is reported at once."""
    exp, problems = build(Experiment, data, source)
    problems += validate(exp, well_typed=not problems)
    if problems:
        raise ConfigError(problems, source)
    return exp


def validate(exp: Experiment, well_typed: bool = True) -> list[str]:
    """Cross-field checks, all collected (no model is loaded before these pass).

    On a config that failed type checks some values are missing or of the wrong type: a check
    unit that trips over one adds nothing (its section's type problem already explains it) and
    the other units still run. On a well-typed config nothing is caught, so a bug here is loud.
    """
    units: list[Callable[[], list[str]]] = [lambda: _suite_problems(exp), lambda: _task_problems(exp),
                                            lambda: _global_problems(exp), lambda: _lora_problems(exp.lora),
                                            lambda: _dataset_problems(exp)]
    units += [partial(_method_problems, name, settings) for name, settings in (exp.methods or {}).items()]
    units += [partial(_train_problems, f"{exp.warmup_settings_key(name)}.train", w.train)
              for name, w in exp.warmup_configs().items()]
    units.append(lambda: _warmup_problems(exp))
    units.append(lambda: _report_problems(exp))
    units += [partial(_grid_problems, exp, i, block) for i, block in enumerate(exp.grid or [])]
    problems: list[str] = []
    for unit in units:
        if well_typed:
            problems += unit()
            continue
        try:
            problems += unit()
        except (TypeError, AttributeError, KeyError):
            pass
    return problems


def _suite_problems(exp: Experiment) -> list[str]:
    from d2lora_dist.evaluate.suites import SUITES  # late: evaluation imports torch

    problems = [f"suites.{name}.kind: {suite.kind!r} is not a suite kind (valid: {', '.join(SUITES)})"
                for name, suite in exp.suites.items() if suite.kind not in SUITES]
    for name, suite in exp.suites.items():
        if suite.batch_size < 1:
            problems.append(f"suites.{name}.batch_size: must be >= 1, got {suite.batch_size}")
        if suite.max_new_tokens < 1:
            problems.append(f"suites.{name}.max_new_tokens: must be >= 1, got {suite.max_new_tokens}")
        if suite.limit is not None and suite.limit < 1:
            problems.append(f"suites.{name}.limit: must be >= 1 or null (all items), got {suite.limit}")
    problems += [f"suites.{name}.dataset: a split: validation suite evaluates the task's validation rows; "
                 "leave dataset out" for name, suite in exp.suites.items()
                 if suite.split == "validation" and suite.dataset is not None]
    return problems + [
        f"suites.{name}.dataset: null means the task holdout, but no task with holdout > 0 lists suite {name!r}"
        for name, suite in exp.suites.items() if suite.dataset is None and suite.split == "test"
        and not any(name in t.suites and t.holdout > 0 for t in exp.tasks.values())]


def _task_problems(exp: Experiment) -> list[str]:
    from d2lora_dist.data.registry import supports  # late: data imports config types

    problems = []
    for tname, task in exp.tasks.items():
        problems += [f"tasks.{tname}.suites: unknown suite {s!r} (defined: {sorted(exp.suites)})"
                     for s in task.suites if s not in exp.suites]
        if task.holdout < 0:
            problems.append(f"tasks.{tname}.holdout: must be >= 0, got {task.holdout}")
        if task.validation < 0:
            problems.append(f"tasks.{tname}.validation: must be >= 0, got {task.validation}")
        elif task.validation > 0 and not supports(task.dataset.name, "eval"):
            problems.append(f"tasks.{tname}.validation: dataset {task.dataset.name!r} has no eval form, so its rows "
                            "cannot be evaluated; use 0")
        problems += [f"tasks.{tname}.suites: {s!r} evaluates the validation split, but tasks.{tname}.validation is 0"
                     for s in task.suites if s in exp.suites and exp.suites[s].split == "validation"
                     and task.validation <= 0]
    return problems


def _method_problems(name: str, settings: TrainSettings) -> list[str]:
    if name not in METHODS:
        return [f"methods.{name}: unknown method (valid: {', '.join(METHODS)})"]
    problems = []
    if METHODS[name].needs_beta and settings.beta is None:
        problems.append(f"methods.{name}.beta: required for {name} (the paper uses 0.1)")
    if settings.per_device_batch_size < METHODS[name].min_micro_batch:
        problems.append(f"methods.{name}.per_device_batch_size: {name} needs at least {METHODS[name].min_micro_batch} "
                        f"rows per micro-batch, got {settings.per_device_batch_size}")
    return problems + _train_problems(f"methods.{name}", settings) + _batching_problems(f"methods.{name}", name,
                                                                                         settings)


def _grid_problems(exp: Experiment, i: int, block: GridBlock) -> list[str]:
    from d2lora_dist.data.registry import supports  # late: data imports config types

    key = f"grid[{i}]"
    problems = []
    task = exp.tasks.get(block.task)
    if task is None:
        problems.append(f"{key}.task: unknown task {block.task!r} (defined: {sorted(exp.tasks)})")
    for m in block.methods:
        if m not in METHODS:
            problems.append(f"{key}.methods: unknown method {m!r} (valid: {', '.join(METHODS)})")
            continue
        form = METHODS[m].form
        if m not in exp.methods:
            problems.append(f"{key}.methods: {m!r} has no settings under `methods`")
        elif task is not None and not supports(task.dataset.name, form):
            problems.append(f"{key}.methods: dataset {task.dataset.name!r} of task {block.task!r} "
                            f"has no {form} form for method {m!r}")
    for init in block.inits:
        if init not in INITS:
            problems.append(f"{key}.inits: unknown init {init!r} (valid: {', '.join(INITS)})")
        elif INITS[init].from_warmup and not exp.warmup_configs():
            problems.append(f"{key}.inits: {init} needs a `warmup` section (or named `warmups`)")
        elif INITS[init].placebo:  # the placebo moves each response to another prompt: two rows at least
            problems += [f"{key}.inits: {init} shuffles the responses of warm-up {name!r} across its prompts, which "
                         f"needs {exp.warmup_settings_key(name)}.n >= 2 (got {cfg.n})"
                         for name, cfg in exp.warmup_configs().items()
                         if (block.warmups is None or name in block.warmups) and cfg.n is not None and cfg.n < 2]
    problems += _axes_problems(exp, key, block)
    if block.tune is not None:
        problems += _tune_problems(exp, f"{key}.tune", block.tune, task, block.task)
    if block.suites is not None and task is not None:
        problems += [f"{key}.suites: {s!r} is not a suite of task {block.task!r} ({task.suites})"
                     for s in block.suites if s not in task.suites]
        if task.suites and task.suites[0] not in block.suites:
            problems.append(f"{key}.suites: must keep the task metric {task.suites[0]!r} of task {block.task!r}")
    return problems + [f"{key}.n: {n} must be >= 0" for n in block.n if n < 0]


def _tune_problems(exp: Experiment, key: str, tune: TuneConfig, task: TaskConfig | None, name: str) -> list[str]:
    """A block's tuning axes: something to try, a validation suite of a task that holds rows out for it."""
    from d2lora_dist.evaluate.suites import SUITES  # late: evaluation imports torch

    axes = {"learning_rate": tune.learning_rate, "epochs": tune.epochs, "min_steps": tune.min_steps}
    problems = [f"{key}.{axis}: empty; leave it out for the method's own value"
                for axis, values in axes.items() if values is not None and not values]
    problems += [f"{key}.{axis}: {values} repeats a value" for axis, values in axes.items()
                 if values and len(set(values)) != len(values)]
    if all(values is None for values in axes.values()):
        problems.append(f"{key}: no axis to tune; give learning_rate, epochs and/or min_steps")
    problems += [f"{key}.learning_rate: {v} must be > 0" for v in tune.learning_rate or [] if not v > 0]
    problems += [f"{key}.epochs: {v} must be > 0" for v in tune.epochs or [] if not v > 0]
    problems += [f"{key}.min_steps: {v} must be >= 0" for v in tune.min_steps or [] if v < 0]
    if not tune.seeds:
        problems.append(f"{key}.seeds: empty; name at least one seed to tune on")
    elif len(set(tune.seeds)) != len(tune.seeds):
        problems.append(f"{key}.seeds: {tune.seeds} repeats a seed")
    suite = exp.suites.get(tune.suite)
    if suite is None:
        return problems + [f"{key}.suite: unknown suite {tune.suite!r} (defined: {sorted(exp.suites)})"]
    if suite.split != "validation":
        problems.append(f"{key}.suite: {tune.suite!r} evaluates the test split; choosing on it would read the test "
                        "items (give the suite split: validation)")
    if task is not None and task.validation <= 0:
        problems.append(f"{key}.suite: task {name!r} holds out no validation rows (set tasks.{name}.validation)")
    metrics = [m for m in SUITES[suite.kind].metrics if m != "items"] if suite.kind in SUITES else []
    if tune.metric is not None and metrics and tune.metric not in metrics:
        problems.append(f"{key}.metric: suite {tune.suite!r} reports no {tune.metric!r} (valid: {', '.join(metrics)})")
    return problems


def _axes_problems(exp: Experiment, key: str, block: GridBlock) -> list[str]:
    """The warm-up and LoRA-init axes of one block."""
    problems = [f"{key}.lora_inits: unknown LoRA init {name!r} (valid: default, gaussian, pissa, olora, pissa_niter_K)"
                for name in block.lora_inits if not is_lora_init(name)]
    if not block.lora_inits:
        problems.append(f"{key}.lora_inits: empty; leave it out for PEFT's default")
    if block.warmups is not None:
        named = exp.warmup_configs()
        problems += [f"{key}.warmups: unknown warm-up {w!r} (defined: {sorted(named)})"
                     for w in block.warmups if w not in named]
        if not block.warmups:
            problems.append(f"{key}.warmups: empty; leave it out for every warm-up")
    for method in block.methods:
        settings = exp.methods.get(method)
        if settings is None or not METHODS.get(method) or not METHODS[method].uses_reference:
            continue
        residual = [n for n in block.lora_inits if is_lora_init(n) and lora_init_spec(n).residual]
        if residual and settings.reference == "base":
            problems.append(f"methods.{method}.reference: 'base' (adapters disabled) is not the base model under "
                            f"{residual[0]} ({key}.lora_inits), which rewrites the base weights into a residual; "
                            "use reference: init (the starting adapter over the residual: the base model for a "
                            "vanilla cell, the warm-up for D2LoRA)")
    return problems


def _warmup_problems(exp: Experiment) -> list[str]:
    if exp.warmup is not None and exp.warmups:
        return ["warmups: give either one `warmup` section or named `warmups`, not both"]
    if exp.warmups is not None and not exp.warmups:
        return ["warmups: empty; name at least one warm-up or leave it out"]
    problems = [f"{exp.warmup_settings_key(name)}.n: must be >= 1 or null (all rows), got {w.n}"
                for name, w in exp.warmup_configs().items() if w.n is not None and w.n < 1]
    problems += [f"warmups.{name}: the name must be lower-case letters, digits and _ (it is part of cell ids and "
                "directory names)" for name in exp.warmups or {} if not _WARMUP_NAME.match(name)]
    return problems + [f"warmups.{name}: the name is taken (Slurm's array of vanilla cells is `{name}`); "
                       "choose another" for name in exp.warmups or {} if name == VANILLA_GROUP]


def _report_problems(exp: Experiment) -> list[str]:
    from d2lora_dist.evaluate.suites import SUITES  # late: evaluation imports torch

    cfg = exp.report
    problems = [] if cfg.min_seeds >= 2 else [
        f"report.min_seeds: must be >= 2 (one seed says nothing about seed-to-seed variation), got {cfg.min_seeds}"]
    problems += [f"report.target_effect.{kind}: not a suite kind (valid: {', '.join(SUITES)})"
                 for kind in cfg.target_effect if kind not in SUITES]
    problems += [f"report.target_effect.{kind}: must be > 0 points, got {value}"
                 for kind, value in cfg.target_effect.items() if not value > 0]
    if not cfg.budget_ratio >= 1:  # also NaN
        problems.append(f"report.budget_ratio: must be a factor >= 1 (1.5: arms whose budgets differ by more "
                        f"than half are marked), got {cfg.budget_ratio}")
    for i, primary in enumerate(cfg.primary):
        problems += _primary_problems(exp, f"report.primary[{i}]", primary, SUITES)
    return problems


def _primary_problems(exp: Experiment, key: str, p: PrimaryComparison, suites: dict[str, Any]) -> list[str]:
    """A primary comparison names a Δ the grid has: both inits at the task, method, n, suite and axes."""
    task = exp.tasks.get(p.task)
    if task is None:
        return [f"{key}.task: unknown task {p.task!r} (defined: {sorted(exp.tasks)})"]
    suite = p.suite or (task.suites[0] if task.suites else None)
    if suite not in task.suites:
        return [f"{key}.suite: {suite!r} is not a suite of task {p.task!r} ({task.suites})"]
    metrics = [m for m in suites[exp.suites[suite].kind].metrics if m != "items"] if suite in exp.suites else []
    if metrics and p.metric is not None and p.metric not in metrics:
        return [f"{key}.metric: suite {suite!r} reports no {p.metric!r} (valid: {', '.join(metrics)})"]
    blocks = [b for b in exp.grid if b.task == p.task]
    if p.n != 0:
        blocks = [b for b in blocks if p.method in b.methods]
        if not blocks:
            return [f"{key}.method: no grid block of task {p.task!r} runs method {p.method!r}"]
    elif p.method not in ("none", *(m for b in blocks for m in b.methods)):
        return [f"{key}.method: {p.method!r} at n = 0 (use none, or a method of task {p.task!r}'s grid)"]
    blocks = [b for b in blocks if p.n in b.n]
    if not blocks:
        have = sorted({n for b in exp.grid if b.task == p.task and (p.n == 0 or p.method in b.methods) for n in b.n})
        return [f"{key}.n: the grid runs task {p.task!r} method {p.method!r} at n = {have}, not {p.n}"]
    blocks = [b for b in blocks if (b.suites is None or suite in b.suites) and p.lora_init in b.lora_inits
              and "lora" in b.inits and any(INITS[i].from_warmup for i in b.inits if i in INITS)]
    if not blocks:
        return [f"{key}: no grid block runs both LoRA and D2LoRA cells of {p.task} {p.method} n={p.n} with suite "
                f"{suite!r} and LoRA init {p.lora_init!r}"]
    warmups = primary_warmups(exp, p)
    if p.warmup is None and len(warmups) > 1:
        return [f"{key}.warmup: the grid has several warm-ups here ({', '.join(warmups)}); name the one compared"]
    if p.warmup is not None and p.warmup not in warmups:
        return [f"{key}.warmup: {p.warmup!r} is not a warm-up of these cells ({', '.join(warmups)})"]
    return []


def primary_warmups(exp: Experiment, p: PrimaryComparison) -> list[str]:
    """The warm-ups whose D2LoRA cells a primary comparison could mean (one, or it must name one)."""
    blocks = [b for b in exp.grid if b.task == p.task and p.n in b.n and (p.n == 0 or p.method in b.methods)]
    return sorted({w for b in blocks for w in (b.warmups or exp.warmup_configs())})


def _dataset_problems(exp: Experiment) -> list[str]:
    """Every dataset reference names a registered dataset."""
    from d2lora_dist.data.registry import REGISTRY  # late: data imports config types

    refs = [(f"tasks.{name}.dataset", t.dataset) for name, t in exp.tasks.items()]
    refs += [(f"suites.{name}.dataset", s.dataset) for name, s in exp.suites.items() if s.dataset is not None]
    refs += [(f"{exp.warmup_settings_key(name)}.dataset", w.dataset) for name, w in exp.warmup_configs().items()]
    return [f"{key}.name: unknown dataset {ref.name!r} (registered: {', '.join(sorted(REGISTRY))})"
            for key, ref in refs if ref.name not in REGISTRY]


def _lora_problems(lora: LoraConfig) -> list[str]:
    problems = []
    if lora.r < 1:
        problems.append(f"lora.r: must be >= 1 (the adapter's rank), got {lora.r}")
    if lora.alpha <= 0:
        problems.append(f"lora.alpha: must be > 0 (the scale is alpha / r), got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        problems.append(f"lora.dropout: must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        problems.append("lora.target_modules: empty; name the modules that get adapters (e.g. [q_proj, v_proj])")
    return problems


def _global_problems(exp: Experiment) -> list[str]:
    problems = []
    if exp.update_warning_below < 0:
        problems.append(f"update_warning_below: must be >= 0, got {exp.update_warning_below}")
    if exp.launch.num_processes < 1:
        problems.append(f"launch.num_processes: must be >= 1, got {exp.launch.num_processes}")
    if exp.launch.gpu_memory_gib <= 0:
        problems.append(f"launch.gpu_memory_gib: must be > 0, got {exp.launch.gpu_memory_gib}")
    from d2lora_dist.strategy import STRATEGIES  # late: strategy reads these config types

    named = [k for k in ("accelerate_config", "deepspeed_config") if getattr(exp.launch, k)]
    if exp.launch.strategy in ("auto", *STRATEGIES) and named:
        problems.append(f"launch.strategy: {exp.launch.strategy!r} chooses the accelerate and DeepSpeed configs, "
                        f"but launch.{named[0]} names one too; keep one of them (strategy: null keeps the named files)")
    return problems


def _train_problems(key: str, t: TrainSettings) -> list[str]:
    problems = []
    if t.learning_rate <= 0:
        problems.append(f"{key}.learning_rate: must be > 0, got {t.learning_rate}")
    if t.max_steps <= 0 and t.epochs <= 0:
        problems.append(f"{key}: set epochs > 0 or max_steps > 0")
    for name in ("per_device_batch_size", "global_batch_size", "max_length", "logging_steps",
                 "save_steps"):
        if getattr(t, name) < 1:
            problems.append(f"{key}.{name}: must be >= 1, got {getattr(t, name)}")
    if t.min_steps < 0:
        problems.append(f"{key}.min_steps: must be >= 0, got {t.min_steps}")
    if t.lora_dropout is not None and not 0.0 <= t.lora_dropout < 1.0:
        problems.append(f"{key}.lora_dropout: must be in [0, 1) or null, got {t.lora_dropout}")
    return problems


def _batching_problems(key: str, method: str, t: TrainSettings) -> list[str]:
    if t.batching != "padding_free" or METHODS[method].padding_free:
        return []
    return [f"{key}.batching: padding_free is not supported by TRL's {METHODS[method].label} trainer (it always "
            "pads); use auto or padded"]
