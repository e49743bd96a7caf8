"""One-GPU throughput and correctness check for LoRA on a Llama-3.1-8B-shaped model (H200, < 8 min).

    bash benchmarks/gpu_check.sh [--out PATH] [--only a,b] [--skip a,b] [--time-limit S]
    bash benchmarks/gpu_check.sh --tiny            # every code path on CPU, hidden 64 / 2 layers, seconds
    python3 benchmarks/gpu_check.py --list-wheels  # the optional wheels and what they enable

Needs only torch, transformers, peft and accelerate (plus safetensors, which transformers brings). TRL
and DeepSpeed are used when importable; the checks that need them are skipped otherwise, with the
reason and the wheels that would enable them in the JSON. It never imports d2lora_dist: the GPU machine
may hold only the four libraries, and no test depends on this file.

Checks, in the order they run (cheap and non-destructive first, so a late failure costs nothing else):
  build            random-init Llama-3.1-8B shape in bf16 directly on the GPU, LoRA r16/a16 on q,k,v,o,gate,up,down;
                   a bf16 matmul rate for context
  sft_no_gc        LoRA SFT step (seq 2048), gradient checkpointing off: tokens/s, MFU
  sft_gc           the same with gradient checkpointing on (non-reentrant, transformers' default)
  dpo              DPO step in plain torch + peft: chosen + rejected through the policy (fwd + bwd) and the
                   reference (adapter disabled, no grad): tokens/s
  generation       greedy generate with the KV cache, batch 16 and 64, 256 new tokens: tokens/s
  warm_start       non-zero LoRA B -> fp32 safetensors -> fresh PeftModel on the same base -> logits equal?
  dpo_trl          TRL's DPOTrainer on its own fresh model (only if trl and datasets import)
  ddp_1rank        the sft_gc step under DistributedDataParallel, world size 1, NCCL (gloo on CPU)
  zero3_1rank      the sft_gc step under DeepSpeed ZeRO-3, world size 1 (only if deepspeed imports); last,
                   because DeepSpeed partitions the model in place

Every check has a time budget (a soft deadline that shortens its timed loop, and SIGALRM as the hard
stop); the script has a global limit, and the wrapper a hard `timeout`. The JSON is rewritten after every
check, so a run killed from outside still leaves every finished figure and the name of the running check.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
H200_PEAK_BF16_TFLOPS = 989.0  # dense bf16, NVIDIA datasheet (SXM); MFU is quoted against this
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA31_8B_PARAMS = 8_030_261_248  # HF's count for meta-llama/Llama-3.1-8B: the shape check in `build`
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# What the skippable checks need beyond the four base libraries. Listed against the H200 image (it has
# pyarrow, pandas, xxhash, msgpack, ninja, einops, py-cpuinfo, psutil but not the names below).
OPTIONAL_PACKAGES: dict[str, dict[str, Any]] = {
    "trl": {"needed_for": ["dpo_trl"],
            "wheels": ["trl", "datasets", "dill", "multiprocess"]},
    "datasets": {"needed_for": ["dpo_trl"], "wheels": ["datasets", "dill", "multiprocess"]},
    "deepspeed": {"needed_for": ["zero3_1rank"],
                  "wheels": ["deepspeed (sdist only on PyPI: build a py3-none-any wheel with DS_BUILD_OPS=0 "
                             "pip wheel --no-deps --no-build-isolation deepspeed)", "hjson", "pydantic",
                             "pydantic-core", "annotated-types", "typing-inspection"]},
}

CHECKS = ["build", "sft_no_gc", "sft_gc", "dpo", "generation", "warm_start", "dpo_trl", "ddp_1rank", "zero3_1rank"]


# ---- plan: every size and budget in one place ------------------------------------------------------
@dataclass
class Plan:
    tiny: bool
    device: str
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0
    seq_len: int = 2048
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05  # the project's SFT default (lora.dropout); DPO runs with 0.0 like its DPO phase
    mb_no_gc: list[int] = field(default_factory=lambda: [4, 2, 1])  # ~24 GB activations+logits per sequence
    mb_gc: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # ~5 GB per sequence, mostly logits
    dpo_pairs: list[int] = field(default_factory=lambda: [4, 2, 1])  # pairs: 2x sequences per step
    warmup_steps: int = 2
    timed_steps: int = 5
    gen_batches: list[int] = field(default_factory=lambda: [16, 64])
    gen_prompt_len: int = 128
    gen_new_tokens: int = 256
    logits_batch: tuple[int, int] = (4, 256)  # warm-start check: (sequences, length)
    matmul_n: int = 8192
    lr: float = 1e-5
    # seconds per check; the sum exceeds the global limit on purpose: the order decides what is cut
    budgets: dict[str, float] = field(default_factory=lambda: {
        "build": 90, "sft_no_gc": 60, "sft_gc": 60, "dpo": 60, "generation": 75, "warm_start": 45,
        "dpo_trl": 90, "ddp_1rank": 60, "zero3_1rank": 120})
    min_budget_s: float = 15.0  # a check with less time left than this is skipped, not started

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        device = args.device
        if device == "auto":
            device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
        if not args.tiny:
            return cls(tiny=False, device=device)
        # hidden 64, 2 layers: the same code paths, seconds on a laptop CPU
        return cls(tiny=True, device=device, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                   vocab=512, seq_len=64, mb_no_gc=[2, 1], mb_gc=[2, 1], dpo_pairs=[2, 1], warmup_steps=1,
                   timed_steps=2, gen_batches=[2, 4], gen_prompt_len=8, gen_new_tokens=16, logits_batch=(2, 32),
                   matmul_n=256, min_budget_s=2.0)


@dataclass
class Counts:
    """Parameter counts that the FLOP formulas use."""

    total: int  # every base parameter
    base_matmul: int  # weights of every base nn.Linear, lm_head included; the input embedding is a lookup
    embedding: int
    lora: int  # trainable LoRA parameters
    layers: int
    d_attn: int  # heads x head_dim


FLOPS_SFT = ("4*N_base + 6*N_lora per token: forward 2*N for every weight; backward 2*N_base for the frozen "
             "base (input gradients only, no weight gradients) and 4*N_lora for LoRA (input and weight "
             "gradients). N_base = weights of every base Linear incl. lm_head, excl. the input embedding. "
             "Attention scores not counted; recompute under gradient checkpointing not counted (MFU, not HFU).")
FLOPS_DPO = ("6*N_base + 6*N_lora per token: the SFT formula for the policy plus 2*N_base for the reference "
             "forward (adapter disabled, no grad).")
FLOPS_ATTN = "mfu_with_attention adds 12*L*d_attn*seq per token (PaLM convention, no causal discount)."


# ---- small helpers ------------------------------------------------------------------------------------
class CheckTimeout(BaseException):
    """Raised by SIGALRM when a check outlives its budget. BaseException so that library code's
    `except Exception` cannot swallow it."""


class _Skip(Exception):
    """A check that cannot run here (a missing optional package): recorded as skipped, not failed."""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def autocast(device: str) -> contextlib.AbstractContextManager:
    # bf16 autocast as HF Trainer's bf16=True does: the base is bf16 already, and PEFT keeps LoRA in fp32,
    # so without autocast every LoRA matmul would run in fp32
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def try_import(name: str) -> tuple[Any | None, str | None]:
    """The module, or None and a reason that names the wheels to carry."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # an ImportError, or a package that breaks while importing (missing dependency)
        wheels = ", ".join(OPTIONAL_PACKAGES.get(name, {}).get("wheels", [name]))
        return None, f"{name} not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); wheels: {wheels}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def random_ids(plan: Plan, rows: int, length: int, seed: int) -> torch.Tensor:
    # token ids >= 3 keep clear of bos/eos/pad of the tiny config; random data is all a throughput test needs
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, plan.vocab, (rows, length), generator=g).to(plan.device)


def make_optimizer(params: list[torch.nn.Parameter], plan: Plan) -> torch.optim.Optimizer:
    # fused AdamW on CUDA, as HF Trainer's default "adamw_torch_fused"
    return torch.optim.AdamW(params, lr=plan.lr, fused=plan.device == "cuda")


def set_gradient_checkpointing(model: torch.nn.Module, on: bool, reentrant: bool = False) -> None:
    if not on:
        model.gradient_checkpointing_disable()
        return
    kwargs = {"use_reentrant": reentrant}
    # transformers >= 5.2x renamed it (the old name warns); the H200 image's 5.17 has only the old one
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_lora_dropout(model: torch.nn.Module, p: float) -> None:
    # PEFT builds nn.Dropout for dropout > 0 (nn.Identity for 0); SFT uses the project's 0.05, DPO 0.0
    for name, module in model.named_modules():
        if ".lora_dropout." in name and isinstance(module, torch.nn.Dropout):
            module.p = p


# ---- the record: one JSON, rewritten after every check --------------------------------------------------
class Record:
    def __init__(self, out: Path, plan: Plan, time_limit: float) -> None:
        self.out = out
        self.plan = plan
        self.t0 = time.monotonic()
        self.deadline = self.t0 + time_limit
        self.data: dict[str, Any] = {
            "schema": "d2lora-gpu-check/1",
            "mode": "tiny" if plan.tiny else "full",
            "status": "running",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "time_limit_s": time_limit,
            "plan": asdict(plan),
            "flops": {"peak_bf16_tflops": H200_PEAK_BF16_TFLOPS, "sft_formula": FLOPS_SFT,
                      "dpo_formula": FLOPS_DPO, "attention": FLOPS_ATTN},
            "checks": {},
            "skipped": [],
            "failed": [],
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)  # atomic: a kill mid-write never leaves half a JSON

    def skip(self, name: str, reason: str) -> None:
        self.data["checks"][name] = {"status": "skipped", "reason": reason}
        self.data["skipped"].append({"check": name, "reason": reason})
        self.write()

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.data["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.data.pop("running_check", None)
        self.write()


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds`: the hard stop of one check (the soft deadline shortens loops first)."""

    def handler(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"budget of {seconds:.1f} s exceeded")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_check(rec: Record, name: str, fn: Callable[[float], dict[str, Any]], partial: dict[str, Any]) -> bool:
    """Run one check under its budget; record ok / failed / timeout with peak memory. True if ok.
    `partial` is where a check leaves what it measured so far: kept when it fails or times out."""
    plan = rec.plan
    budget = min(plan.budgets[name], rec.left() - 3.0)  # 3 s kept for the final JSON and table
    if plan.budgets[name] < plan.min_budget_s:
        rec.skip(name, f"its budget ({plan.budgets[name]:g} s) is below the minimum of {plan.min_budget_s:g} s")
        return False
    if budget < plan.min_budget_s:
        rec.skip(name, f"out of time: {rec.left():.0f} s left of the script's {rec.data['time_limit_s']:.0f} s limit")
        return False
    partial.clear()
    rec.data["running_check"] = name
    rec.write()
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    entry: dict[str, Any] = {"budget_s": round(budget, 1)}
    t0 = time.monotonic()
    soft_deadline = t0 + 0.85 * budget  # timed loops stop early here; the alarm is the hard stop
    try:
        with alarm(budget):
            entry.update(fn(soft_deadline))
        entry["status"] = "ok"
    except _Skip as exc:  # an optional package found missing or broken only at import
        entry.update(status="skipped", reason=str(exc))
        rec.data["skipped"].append({"check": name, "reason": str(exc)})
    except CheckTimeout as exc:
        entry.update(status="timeout", error=str(exc))
        rec.data["failed"].append({"check": name, "error": str(exc)})
    except Exception as exc:  # a failed check is recorded and the rest continue
        tb = traceback.format_exc().strip().splitlines()
        entry.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:500]}", traceback=tb[-12:])
        rec.data["failed"].append({"check": name, "error": entry["error"]})
    if entry["status"] in ("failed", "timeout") and partial:
        entry["partial"] = json.loads(json.dumps(partial, default=str))
    entry["seconds"] = round(time.monotonic() - t0, 2)
    if plan.device == "cuda":
        entry.setdefault("peak_mem_allocated_gib", gib(torch.cuda.max_memory_allocated()))
        entry.setdefault("peak_mem_reserved_gib", gib(torch.cuda.max_memory_reserved()))
    else:  # no per-check peak on CPU: the process high-water mark (Linux ru_maxrss is in KiB)
        entry["peak_rss_process_gib"] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rec.data["checks"][name] = entry
    rec.data.pop("running_check", None)
    free_memory()
    rec.write()
    print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s"
          + (f" ({entry.get('error') or entry.get('reason')})" if entry["status"] != "ok" else ""), flush=True)
    return entry["status"] == "ok"


# ---- environment ----------------------------------------------------------------------------------------
def environment(plan: Plan) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "hostname": socket.gethostname(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": {n: package_version(n) for n in
                     ["transformers", "peft", "accelerate", "safetensors", "trl", "datasets", "deepspeed",
                      "flash-attn", "numpy"]},
    }
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        env["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                      "total_memory_gib": gib(props.total_memory), "free_memory_at_start_gib": gib(free),
                      "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                      "driver": nvidia_smi_driver()}
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        env["gpu"] = None
    return env


def nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def optional_packages() -> dict[str, Any]:
    found = {}
    for name, info in OPTIONAL_PACKAGES.items():
        spec = importlib.util.find_spec(name)
        found[name] = {"installed": spec is not None, "version": package_version(name), **info}
    return found


# ---- model --------------------------------------------------------------------------------------------
def attention_implementation(plan: Plan) -> str:
    # as the project's `attn_implementation: auto`: flash-attention 2 when installed on CUDA, else SDPA
    if plan.device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def llama_config(plan: Plan) -> Any:
    from transformers import LlamaConfig

    special = (128000, 128001) if not plan.tiny else (1, 2)
    return LlamaConfig(hidden_size=plan.hidden, num_hidden_layers=plan.layers, num_attention_heads=plan.heads,
                       num_key_value_heads=plan.kv_heads, intermediate_size=plan.intermediate,
                       vocab_size=plan.vocab, rope_theta=plan.rope_theta, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=special[0],
                       eos_token_id=special[1])  # use_cache stays on for generate; training passes False


def build_base(plan: Plan) -> Any:
    """Random-init Llama in bf16, built directly on the target device: under a torch.device context every
    parameter is allocated there (no 16 GB CPU copy, no download)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(plan.device):
        return AutoModelForCausalLM.from_config(llama_config(plan), dtype=torch.bfloat16,
                                                attn_implementation=attention_implementation(plan))


def lora_config(plan: Plan, dropout: float) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=dropout,
                      target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM")


def count_params(base: torch.nn.Module, plan: Plan) -> Counts:
    linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    emb = base.get_input_embeddings().weight.numel()
    return Counts(total=sum(p.numel() for p in base.parameters()), base_matmul=linear, embedding=emb, lora=0,
                  layers=plan.layers, d_attn=plan.hidden)


def matmul_tflops(plan: Plan) -> float:
    """bf16 n x n x n matmul rate: the chip's achievable ceiling, for reading MFU against."""
    n = plan.matmul_n
    a = torch.randn(n, n, device=plan.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=plan.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(plan.device)
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    sync(plan.device)
    return round(2 * n**3 * reps / (time.perf_counter() - t) / 1e12, 1)


# ---- timing -------------------------------------------------------------------------------------------
def timed_steps(step: Callable[[], torch.Tensor | None], plan: Plan, soft_deadline: float) -> dict[str, Any]:
    """Warm-up steps, then timed steps with a device sync around each. The number of timed steps shrinks
    when the last warm-up step says they would not fit before the soft deadline (at least one runs)."""
    losses: list[float] = []
    last = 0.0
    for _ in range(plan.warmup_steps):
        sync(plan.device)
        t = time.perf_counter()
        loss = step()
        sync(plan.device)
        last = time.perf_counter() - t
        if loss is not None:
            losses.append(float(loss))
    fits = int((soft_deadline - time.monotonic()) / max(last, 1e-6))
    n = max(1, min(plan.timed_steps, fits))
    times: list[float] = []
    for _ in range(n):
        sync(plan.device)
        t = time.perf_counter()
        loss = step()
        sync(plan.device)
        times.append(time.perf_counter() - t)
        if loss is not None:
            losses.append(float(loss))
    return {"warmup_steps": plan.warmup_steps, "timed_steps": n, "timed_steps_planned": plan.timed_steps,
            "step_s_mean": round(statistics.fmean(times), 4), "step_s_median": round(statistics.median(times), 4),
            "step_s_min": round(min(times), 4), "step_times_s": [round(x, 4) for x in times],
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def first_micro_batch_that_fits(candidates: list[int], attempt: Callable[[int], dict[str, Any]],
                                plan: Plan) -> dict[str, Any]:
    """Try micro-batches from the largest down; an OOM frees memory and tries the next one."""
    oom_at: list[int] = []
    for mb in candidates:
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the peak reported is the one of the size that fitted
        failed = False
        try:
            result = attempt(mb)
        except OOM:
            failed = True  # handled outside the except block, so the traceback's tensors are released
        if failed:
            oom_at.append(mb)
            free_memory()
            continue
        result.update(micro_batch=mb, oom_at_micro_batch=oom_at)
        return result
    raise RuntimeError(f"out of memory at every micro-batch tried: {candidates}")


def throughput(result: dict[str, Any], tokens_per_step: int, flops_per_token: float, attn_per_token: float
               ) -> dict[str, Any]:
    tps = tokens_per_step / result["step_s_mean"]
    peak = H200_PEAK_BF16_TFLOPS * 1e12
    return {"tokens_per_step": tokens_per_step, "tokens_per_s": round(tps, 1),
            "tokens_per_s_median_step": round(tokens_per_step / result["step_s_median"], 1),
            "flops_per_token": flops_per_token, "achieved_tflops": round(tps * flops_per_token / 1e12, 1),
            "mfu": round(tps * flops_per_token / peak, 4),
            "mfu_with_attention": round(tps * (flops_per_token + attn_per_token) / peak, 4)}


# ---- the checks ----------------------------------------------------------------------------------------
class State:
    """What the checks share: the PEFT model (replaced by warm_start, consumed by zero3) and results."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.model: Any = None
        self.counts: Counts | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.partial: dict[str, Any] = {}  # the running check's figures so far (kept if it fails)


def check_build(state: State, soft_deadline: float) -> dict[str, Any]:
    from peft import get_peft_model

    plan = state.plan
    if plan.device == "cuda":
        torch.cuda.set_device(0)
    t = time.perf_counter()
    base = build_base(plan)
    sync(plan.device)
    build_s = time.perf_counter() - t
    devices = sorted({str(p.device) for p in base.parameters()})
    dtypes = sorted({str(p.dtype) for p in base.parameters()})
    counts = count_params(base, plan)
    t = time.perf_counter()
    model = get_peft_model(base, lora_config(plan, plan.lora_dropout))
    peft_s = time.perf_counter() - t
    counts.lora = sum(p.numel() for p in trainable(model))
    lora_dtypes = sorted({str(p.dtype) for p in trainable(model)})
    state.model, state.counts = model, counts
    cfg = base.config
    return {
        "config": {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                   "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                   "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
                   "rope": getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)},
                   "attn_implementation": getattr(cfg, "_attn_implementation", None)},
        "params": asdict(counts),
        "matches_llama31_8b_param_count": counts.total == LLAMA31_8B_PARAMS if not plan.tiny else None,
        "param_devices": devices, "param_dtypes": dtypes, "lora_dtypes": lora_dtypes,
        "lora": {"r": plan.lora_r, "alpha": plan.lora_alpha, "dropout": plan.lora_dropout,
                 "target_modules": TARGET_MODULES},
        "build_s": round(build_s, 2), "get_peft_model_s": round(peft_s, 2),
        "matmul_bf16_tflops": matmul_tflops(plan), "matmul_n": plan.matmul_n,
    }


def sft_step(model: Any, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], ids: torch.Tensor,
             device: str) -> torch.Tensor:
    """One optimizer step of causal-LM SFT: labels = inputs (HF shifts), clipping at 1.0 as the trainer."""
    with autocast(device):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def sft_attempt(model: Any, state: State, mb: int, soft_deadline: float) -> dict[str, Any]:
    plan = state.plan
    params = trainable(model)
    model.zero_grad(set_to_none=True)  # an OOM or a timed-out check may have left gradients behind
    opt = make_optimizer(params, plan)
    ids = random_ids(plan, mb, plan.seq_len, seed=mb)
    return timed_steps(lambda: sft_step(model, opt, params, ids, plan.device), plan, soft_deadline)


def check_sft(state: State, soft_deadline: float, checkpointing: bool) -> dict[str, Any]:
    plan, model, c = state.plan, state.model, state.counts
    model.train()
    set_lora_dropout(model, plan.lora_dropout)
    set_gradient_checkpointing(model, checkpointing, reentrant=False)
    candidates = plan.mb_gc if checkpointing else plan.mb_no_gc
    r = first_micro_batch_that_fits(candidates, lambda mb: sft_attempt(model, state, mb, soft_deadline), plan)
    r.update(seq_len=plan.seq_len, gradient_checkpointing=checkpointing,
             use_reentrant=False if checkpointing else None, lora_dropout=plan.lora_dropout)
    r.update(throughput(r, r["micro_batch"] * plan.seq_len, 4 * c.base_matmul + 6 * c.lora,
                        12 * c.layers * c.d_attn * plan.seq_len))
    return r


def sequence_logps(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the completion positions of each sequence. cross_entropy on the fp32
    logits keeps one (B, S, V) fp32 tensor instead of a full log_softmax copy."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    labels = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                            reduction="none").view_as(labels)
    return -(nll * mask[:, 1:]).sum(-1)


def dpo_step(model: Any, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], ids: torch.Tensor,
             mask: torch.Tensor, device: str, beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO on a [chosen; rejected] batch. The reference (adapter disabled, no grad) runs first so
    its logits are freed before the policy's activations exist."""
    with torch.no_grad(), model.disable_adapter(), autocast(device):
        ref = sequence_logps(model, ids, mask)
    with autocast(device):
        pol = sequence_logps(model, ids, mask)
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    loss = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def dpo_batch(plan: Plan, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pairs chosen + pairs rejected sequences of seq_len: a shared prompt (first half), different completions."""
    half = plan.seq_len // 2
    prompt = random_ids(plan, pairs, half, seed=100 + pairs)
    chosen = random_ids(plan, pairs, plan.seq_len - half, seed=200 + pairs)
    rejected = random_ids(plan, pairs, plan.seq_len - half, seed=300 + pairs)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)], 0)
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, half:] = 1.0
    return ids, mask


def check_dpo(state: State, soft_deadline: float) -> dict[str, Any]:
    plan, model, c = state.plan, state.model, state.counts
    model.train()
    set_lora_dropout(model, 0.0)  # the project's DPO phase: dropout would make the log-ratio noisy
    set_gradient_checkpointing(model, True, reentrant=False)
    with torch.no_grad():  # B = 0: the policy equals the reference, so the first loss must be ln 2
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    params = trainable(model)

    def attempt(pairs: int) -> dict[str, Any]:
        model.zero_grad(set_to_none=True)
        opt = make_optimizer(params, plan)
        ids, mask = dpo_batch(plan, pairs)
        return timed_steps(lambda: dpo_step(model, opt, params, ids, mask, plan.device), plan, soft_deadline)

    r = first_micro_batch_that_fits(plan.dpo_pairs, attempt, plan)
    r.update(pairs=r.pop("micro_batch"), oom_at_pairs=r.pop("oom_at_micro_batch"), seq_len=plan.seq_len,
             gradient_checkpointing=True, use_reentrant=False, reference="adapter disabled (base model)",
             beta=0.1, lora_dropout=0.0, implementation="plain torch + peft",
             first_loss_minus_ln2=None if r["loss_first"] is None else r["loss_first"] - math.log(2))
    sequences = 2 * r["pairs"]
    r.update(throughput(r, sequences * plan.seq_len, 6 * c.base_matmul + 6 * c.lora,
                        (12 + 4) * c.layers * c.d_attn * plan.seq_len))
    return r


def check_generation(state: State, soft_deadline: float) -> dict[str, Any]:
    from transformers import GenerationConfig

    plan, model = state.plan, state.model
    model.eval()
    set_gradient_checkpointing(model, False)

    def generate(ids: torch.Tensor, new: int) -> tuple[float, int, str]:
        # min = max new tokens: a random model may emit eos early, and every row must decode `new` tokens
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
                               use_cache=True, pad_token_id=0)
        mask = torch.ones_like(ids)
        sync(plan.device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                 return_dict_in_generate=True)
        sync(plan.device)
        cache = type(getattr(out, "past_key_values", None)).__name__  # proof the KV cache was used
        return time.perf_counter() - t, out.sequences.shape[1] - ids.shape[1], cache

    results = state.partial  # filled batch by batch: a timeout keeps the batches already measured
    results.update(prompt_len=plan.gen_prompt_len, new_tokens=plan.gen_new_tokens, greedy=True, kv_cache=True,
                   adapter="active (unmerged LoRA)", autocast=False)
    for batch in plan.gen_batches:
        key = f"batch_{batch}"
        if time.monotonic() > soft_deadline:
            results[key] = {"status": "skipped", "reason": "check budget spent"}
            continue
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ids = random_ids(plan, batch, plan.gen_prompt_len, seed=400 + batch)
        generate(ids, 4)  # warm-up: kernels, allocator, cache classes
        prefill_s, _, _ = generate(ids, 1)
        total_s, produced, cache = generate(ids, plan.gen_new_tokens)
        decode_s = max(total_s - prefill_s, 1e-9)
        results[key] = {
            "batch": batch, "new_tokens_generated": produced, "cache": cache, "seconds": round(total_s, 3),
            "tokens_per_s": round(batch * produced / total_s, 1),
            "prefill_plus_first_token_s": round(prefill_s, 4),
            "decode_tokens_per_s": round(batch * (produced - 1) / decode_s, 1),
            "ms_per_decode_step": round(1000 * decode_s / max(produced - 1, 1), 2),
        }
        if plan.device == "cuda":
            results[key]["peak_mem_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
    return dict(results)


def logits_of(model: Any, ids: torch.Tensor, device: str) -> torch.Tensor:
    with torch.no_grad(), autocast(device):
        return model(input_ids=ids, use_cache=False).logits.float()


def check_warm_start(state: State, soft_deadline: float) -> dict[str, Any]:
    """Save a LoRA adapter with non-zero B as fp32 safetensors, reload it into a fresh PeftModel on the same
    base, and compare logits on a fixed batch. A save through bf16 would change B by up to 2^-8 relative
    and show here as a non-zero difference."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    plan, model = state.plan, state.model
    model.eval()
    set_gradient_checkpointing(model, False)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((0.02 * torch.randn(p.shape, generator=g)).to(p.dtype))
    ids = random_ids(plan, *plan.logits_batch, seed=500)
    before = logits_of(model, ids, plan.device)
    with model.disable_adapter():
        base_only = logits_of(model, ids, plan.device)
    adapter_effect = (before - base_only).abs().max().item()
    del base_only

    with tempfile.TemporaryDirectory(prefix="gpu_check_adapter_") as tmp:
        # the project's rule: adapters are saved as float32, whatever the training dtype
        sd = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
        save_file(sd, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(tmp)
        saved = load_file(os.path.join(tmp, "adapter_model.safetensors"))
        saved_info = {"tensors": len(saved), "bytes": os.path.getsize(os.path.join(tmp, "adapter_model.safetensors")),
                      "dtypes": sorted({str(v.dtype) for v in saved.values()}),
                      "lora_B_nonzero": all(bool(v.abs().max() > 0) for k, v in saved.items() if "lora_B" in k),
                      "bit_equal_to_parameters": all(torch.equal(saved[k], sd[k]) for k in sd)}
        state.model = None  # from here the old wrapper is unusable: if the reload fails, later checks skip
        base = model.unload()  # LoRA layers out, base weights untouched (no merge): the same base tensors
        fresh = PeftModel.from_pretrained(base, tmp, is_trainable=True)  # trainable: later checks train it
    fresh.eval()
    after = logits_of(fresh, ids, plan.device)
    state.model = fresh
    diff = (after - before).abs().max().item()
    scale = before.abs().max().item()
    tolerance = 2.0**-8 * max(1.0, scale)  # one bf16 rounding step at the logits' magnitude
    return {"batch": list(plan.logits_batch), "max_abs_diff": diff, "exact": diff == 0.0,
            "tolerance_bf16": tolerance, "passed": diff == 0.0 or diff <= tolerance,
            "logits_max_abs": scale, "adapter_effect_max_abs": adapter_effect,
            "adapter_changes_logits": adapter_effect > 0.0, "saved": saved_info,
            "reloaded_lora_dtypes": sorted({str(p.dtype) for p in trainable(fresh)}),
            "how": "lora_B ~ N(0, 0.02); fp32 state dict -> safetensors; unload(); PeftModel.from_pretrained(base)"}


class StepTimer:
    """TrainerCallback-shaped: device-synchronised wall time of every optimizer step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self._t = 0.0

    def attach(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync(timer.device)
                timer._t = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync(timer.device)
                timer.times.append(time.perf_counter() - timer._t)

        return _Callback()


def word_tokenizer(vocab: int) -> Any:
    """An in-memory whitespace tokenizer "w<i>" -> i: TRL needs a processing_class, and nothing can be
    downloaded. The last three ids are <unk>, <pad>, <eos>."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 3)}
    words.update({"<unk>": vocab - 3, "<pad>": vocab - 2, "<eos>": vocab - 1})
    tk = Tokenizer(WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def check_dpo_trl(state: State, soft_deadline: float) -> dict[str, Any]:
    """TRL's DPOTrainer, a few steps, on its own fresh base (TRL patches the model it trains; the shared
    one stays clean). Rows are built to fill exactly seq_len tokens, like the plain DPO check."""
    plan, c = state.plan, state.counts
    trl, why = try_import("trl")
    datasets, why_ds = try_import("datasets")
    if trl is None or datasets is None:
        raise _Skip(why or why_ds or "")
    pairs = state.results.get("dpo", {}).get("pairs", plan.dpo_pairs[-1])
    steps = plan.warmup_steps + plan.timed_steps
    half = plan.seq_len // 2
    g = torch.Generator().manual_seed(600)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, plan.vocab - 3, (n,), generator=g).tolist())

    rows = [{"prompt": words(half), "chosen": " " + words(plan.seq_len - half - 1) + " <eos>",
             "rejected": " " + words(plan.seq_len - half - 1) + " <eos>"} for _ in range(pairs * steps)]
    base = build_base(plan)
    timer = StepTimer(plan.device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_trl_") as tmp:
        args = trl.DPOConfig(output_dir=tmp, per_device_train_batch_size=pairs, max_steps=steps,
                             learning_rate=plan.lr, lr_scheduler_type="constant", beta=0.1,
                             max_length=plan.seq_len, gradient_checkpointing=True, bf16=plan.device == "cuda",
                             use_cpu=plan.device == "cpu", report_to="none", save_strategy="no",
                             logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                             max_grad_norm=1.0)
        trainer = trl.DPOTrainer(model=base, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=word_tokenizer(plan.vocab),
                                 peft_config=lora_config(plan, 0.0), callbacks=[timer.attach()])
        shapes: list[list[int]] = []
        collate = trainer.data_collator

        def recording_collator(examples: list[dict[str, Any]]) -> Any:
            batch = collate(examples)  # the padded [chosen; rejected] batch TRL really feeds the model
            shapes.append(list(batch["input_ids"].shape))
            return batch

        trainer.data_collator = recording_collator
        trainer.train()
        trainer.accelerator.free_memory()
        del trainer
    del base
    if len(timer.times) <= plan.warmup_steps:
        raise RuntimeError(f"TRL ran {len(timer.times)} steps, expected {steps}")
    times = timer.times[plan.warmup_steps:]
    tokens_per_step = math.prod(shapes[-1]) if shapes else 2 * pairs * plan.seq_len
    r = {"trl": trl.__version__, "pairs": pairs, "seq_len": plan.seq_len, "batch_shapes": shapes[:2],
         "warmup_steps": plan.warmup_steps,
         "timed_steps": len(times), "step_s_mean": round(statistics.fmean(times), 4),
         "step_s_median": round(statistics.median(times), 4), "step_times_s": [round(x, 4) for x in times],
         "reference": "adapter disabled (peft_config given to the trainer)", "gradient_checkpointing": True}
    r.update(throughput(r, tokens_per_step, 6 * c.base_matmul + 6 * c.lora,
                        (12 + 4) * c.layers * c.d_attn * plan.seq_len))
    plain = state.results.get("dpo")
    if plain and plain.get("pairs") == pairs:
        r["step_time_ratio_vs_plain_dpo"] = round(r["step_s_mean"] / plain["step_s_mean"], 3)
    return r


def ensure_process_group(plan: Plan) -> dict[str, Any]:
    """World size 1 on 127.0.0.1: NCCL on the GPU (gloo on CPU). Kept for ZeRO-3, which reuses it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "initialized_here": False}
    backend = "nccl" if plan.device == "cuda" else "gloo"
    port = free_port()
    # DeepSpeed reads these; setting them also keeps accelerate/transformers agreeing on rank 0 of 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    t = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60),
                            **({"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}))
    return {"backend": backend, "world_size": 1, "initialized_here": True,
            "init_s": round(time.perf_counter() - t, 3)}


def ratio_vs_plain(state: State, r: dict[str, Any]) -> dict[str, Any]:
    """Step time per token against the plain sft_gc step (equal to the step time ratio at the same
    micro-batch, which is what the checks use unless the wrapped step ran out of memory)."""
    plain = state.results.get("sft_gc")
    if not plain or "step_s_mean" not in plain:
        return {"step_time_ratio_vs_plain": None, "ratio_note": "sft_gc has no figure to compare with"}
    mine = r["step_s_mean"] / r["tokens_per_step"]
    ref = plain["step_s_mean"] / plain["tokens_per_step"]
    return {"step_time_ratio_vs_plain": round(mine / ref, 3), "plain_step_s_mean": plain["step_s_mean"],
            "plain_micro_batch": plain["micro_batch"]}


def check_ddp(state: State, soft_deadline: float) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    plan, model, c = state.plan, state.model, state.counts
    pg = ensure_process_group(plan)
    model.train()
    set_lora_dropout(model, plan.lora_dropout)
    set_gradient_checkpointing(model, True, reentrant=False)  # non-reentrant: no static_graph needed
    ddp = DDP(model, device_ids=[0] if plan.device == "cuda" else None, find_unused_parameters=False,
              gradient_as_bucket_view=True)
    # the same micro-batch as sft_gc, smaller only if DDP's buckets tip it over; the DDP object (and its
    # reducer's autograd hooks) goes when this function returns, the module itself is unchanged
    mb0 = state.results.get("sft_gc", {}).get("micro_batch", plan.mb_gc[0])
    candidates = [m for m in plan.mb_gc if m <= mb0]
    r = first_micro_batch_that_fits(candidates, lambda mb: sft_attempt(ddp, state, mb, soft_deadline), plan)
    r.update(process_group=pg, seq_len=plan.seq_len, gradient_checkpointing=True, use_reentrant=False)
    r.update(throughput(r, r["micro_batch"] * plan.seq_len, 4 * c.base_matmul + 6 * c.lora,
                        12 * c.layers * c.d_attn * plan.seq_len))
    r.update(ratio_vs_plain(state, r))
    return r


def zero3_config(plan: Plan, mb: int) -> tuple[dict[str, Any], str]:
    """ds_configs/zero3_bf16.json with its "auto" values filled as HF's integration fills them (batch
    sizes from the micro-batch, buckets from the hidden size); a built-in copy when the file is absent."""
    path = REPO / "ds_configs" / "zero3_bf16.json"
    if path.is_file():
        cfg, source = json.loads(path.read_text()), str(path.relative_to(REPO))
    else:
        cfg, source = {"bf16": {"enabled": True}, "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9}}, "built-in"
    cfg.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=1, train_batch_size=mb,
               gradient_clipping=1.0, steps_per_print=10**6, zero_allow_untested_optimizer=True)
    z = cfg["zero_optimization"]
    h = plan.hidden
    fill = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h}
    for key, value in fill.items():
        if z.get(key) == "auto":
            z[key] = value
    if plan.device != "cuda":  # CPU ranks: fp32 and no comm overlap, as ds_configs/zero3_cpu_test.json
        cfg["bf16"] = {"enabled": False}
        z["overlap_comm"] = False
    return cfg, source


def check_zero3(state: State, soft_deadline: float) -> dict[str, Any]:
    plan, model, c = state.plan, state.model, state.counts
    if plan.device != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for a GPU and warns
    ds, why = try_import("deepspeed")
    if ds is None:
        raise _Skip(why or "")
    pg = ensure_process_group(plan)
    # bf16 LoRA as the project under ZeRO-3 (autocast_adapter_dtype=False): fp32 LoRA next to a bf16 base
    # breaks ZeRO-3's coalesced all-gather (DeepSpeed 8072); CPU ranks train in fp32
    model.to(torch.bfloat16 if plan.device == "cuda" else torch.float32)
    model.train()
    set_lora_dropout(model, plan.lora_dropout)
    set_gradient_checkpointing(model, True, reentrant=True)  # PEFT + ZeRO-3 needs reentrant (TRL forces it)
    state.model = None  # DeepSpeed partitions the module in place: nothing after this may use it
    mb = state.results.get("sft_gc", {}).get("micro_batch", plan.mb_gc[-1])
    cfg, source = zero3_config(plan, mb)
    t = time.perf_counter()
    opt = torch.optim.AdamW(trainable(model), lr=plan.lr)
    engine, _, _, _ = ds.initialize(model=model, optimizer=opt, config=cfg)
    init_s = time.perf_counter() - t
    ids = random_ids(plan, mb, plan.seq_len, seed=mb)

    def step() -> torch.Tensor:
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    try:
        r = timed_steps(step, plan, soft_deadline)
    finally:
        with contextlib.suppress(Exception):
            engine.destroy()  # releases DeepSpeed's hooks and buffers
    r.update(micro_batch=mb, deepspeed=ds.__version__, config_source=source, process_group=pg,
             initialize_s=round(init_s, 2), seq_len=plan.seq_len, gradient_checkpointing=True, use_reentrant=True,
             lora_dtype="bfloat16" if plan.device == "cuda" else "float32",
             zero_optimization={k: v for k, v in cfg["zero_optimization"].items()})
    r.update(throughput(r, mb * plan.seq_len, 4 * c.base_matmul + 6 * c.lora,
                        12 * c.layers * c.d_attn * plan.seq_len))
    r.update(ratio_vs_plain(state, r))
    return r


# ---- driver -------------------------------------------------------------------------------------------
def check_functions(state: State) -> dict[str, Callable[[float], dict[str, Any]]]:
    return {
        "build": lambda d: check_build(state, d),
        "sft_no_gc": lambda d: check_sft(state, d, checkpointing=False),
        "sft_gc": lambda d: check_sft(state, d, checkpointing=True),
        "dpo": lambda d: check_dpo(state, d),
        "generation": lambda d: check_generation(state, d),
        "warm_start": lambda d: check_warm_start(state, d),
        "dpo_trl": lambda d: check_dpo_trl(state, d),
        "ddp_1rank": lambda d: check_ddp(state, d),
        "zero3_1rank": lambda d: check_zero3(state, d),
    }


def precondition(state: State, name: str) -> str | None:
    """Why `name` cannot start now, or None."""
    if name != "build" and state.counts is None:
        return "build did not succeed: no model"
    if name in {"sft_no_gc", "sft_gc", "dpo", "generation", "warm_start", "ddp_1rank", "zero3_1rank"} \
            and state.model is None:
        return "the shared model is gone (an earlier check consumed or broke it)"
    if name == "dpo_trl":
        for pkg in ("trl", "datasets"):
            if importlib.util.find_spec(pkg) is None:
                return f"{pkg} is not installed; wheels: {', '.join(OPTIONAL_PACKAGES[pkg]['wheels'])}"
    if name == "zero3_1rank" and importlib.util.find_spec("deepspeed") is None:
        return f"deepspeed is not installed; wheels: {', '.join(OPTIONAL_PACKAGES['deepspeed']['wheels'])}"
    return None


def run_all(rec: Record, state: State, selected: list[str]) -> None:
    functions = check_functions(state)
    for name in CHECKS:
        if name not in selected:
            continue
        why = precondition(state, name)
        if why:
            rec.skip(name, why)
            print(f"[gpu_check] {name}: skipped ({why})", flush=True)
            continue
        if run_check(rec, name, functions[name], state.partial):
            state.results[name] = rec.data["checks"][name]


def summary_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in CHECKS:
        e = data["checks"].get(name)
        if e is None:
            continue
        fig = ""
        if e.get("status") == "ok":
            if "tokens_per_s" in e:
                fig = f"{e['tokens_per_s']:,.0f} tok/s, MFU {100 * e['mfu']:.1f}%, mb {e.get('micro_batch', e.get('pairs'))}"
                if e.get("step_time_ratio_vs_plain") is not None:
                    fig += f", x{e['step_time_ratio_vs_plain']} vs plain"
            elif name == "generation":
                fig = ", ".join(f"b{v['batch']}: {v['tokens_per_s']:,.0f} tok/s" for k, v in e.items()
                                if k.startswith("batch_") and "batch" in v)
            elif name == "warm_start":
                fig = f"max|dlogits| {e['max_abs_diff']:.3g} ({'pass' if e['passed'] else 'FAIL'})"
            elif name == "build":
                fig = f"{e['params']['total'] / 1e9:.2f}B + {e['params']['lora'] / 1e6:.1f}M LoRA, matmul {e['matmul_bf16_tflops']} TF/s"
        else:
            fig = (e.get("reason") or e.get("error") or "")[:70]
        mem = e.get("peak_mem_allocated_gib")
        rows.append([name, e.get("status", "?"), fig, "" if mem is None else f"{mem:.1f}",
                     "" if e.get("seconds") is None else f"{e['seconds']:.1f}"])
    return rows


def print_table(data: dict[str, Any]) -> None:
    rows = [["check", "status", "figure", "peak GiB", "s"], *summary_rows(data)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    gpu = (data.get("environment") or {}).get("gpu") or {}
    print(f"GPU: {gpu.get('name', 'none')} {gpu.get('total_memory_gib', '')} GiB; wall {data.get('wall_s')} s; "
          f"status {data['status']}")


def quiet_libraries() -> None:
    """The device returns only the tail of the output: keep the table in it. Deprecation notices from
    DeepSpeed (one per reduce-scatter) and transformers' renames carry no information for this check."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON path (default $OUT/gpu_check.json, else ./gpu_check.json)")
    ap.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, seq 64: every path, on CPU, in seconds")
    ap.add_argument("--dry-run", dest="tiny", action="store_true", help="same as --tiny")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--only", default="", help=f"comma list of checks among {','.join(CHECKS)} (build always runs)")
    ap.add_argument("--skip", default="", help="comma list of checks to skip")
    ap.add_argument("--time-limit", type=float, default=450.0,
                    help="seconds for all checks together (the wrapper's hard timeout is 20 s more)")
    ap.add_argument("--budget", action="append", default=[], metavar="CHECK=S",
                    help="override one check's time budget in seconds (repeatable)")
    ap.add_argument("--list-wheels", action="store_true", help="print the optional wheels and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_wheels:
        print(json.dumps(optional_packages(), indent=2))
        return 0
    plan = Plan.make(args)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in plan.budgets:
            print(f"gpu_check: error: --budget {item}: no check named {name!r} ({', '.join(CHECKS)})", file=sys.stderr)
            return 2
        plan.budgets[name] = float(seconds)
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    rec = Record(out, plan, args.time_limit)

    def on_term(signum: int, frame: Any) -> None:
        # the wrapper's `timeout` sends TERM: keep what was measured, say which check was cut
        rec.data["terminated_during"] = rec.data.get("running_check")
        rec.finish("terminated (SIGTERM, hard time limit)")
        print_table(rec.data)
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    quiet_libraries()
    rec.data["environment"] = environment(plan)
    rec.data["optional_packages"] = optional_packages()
    rec.write()
    if plan.device == "cuda" and not torch.cuda.is_available():
        rec.skip("build", "no CUDA device; run with --tiny for the CPU path")
        rec.finish("no GPU")
        print_table(rec.data)
        return 2
    selected = [c for c in CHECKS if not args.only or c in args.only.split(",") or c == "build"]
    selected = [c for c in selected if c not in args.skip.split(",")]
    state = State(plan)
    run_all(rec, state, selected)
    status = "complete" if not rec.data["failed"] else f"complete with {len(rec.data['failed'])} failed check(s)"
    rec.finish(status)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    print_table(rec.data)
    print(f"JSON: {out}")
    return 0 if not rec.data["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
