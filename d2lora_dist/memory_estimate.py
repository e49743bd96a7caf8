"""Memory per device of one LoRA training phase, from the model's shape: before anything loads.

Four parts, each split over ranks the way the launch strategy splits it (d2lora_dist/strategy.py):
- base weights: parameters x dtype bytes (frozen: no gradients, no optimizer state);
- adapter: LoRA A and B of every targeted module, 16 bytes per parameter (fp32 value,
  fp32 gradient, Adam's two fp32 moments; under DeepSpeed bf16 a bf16 copy plus an fp32 master
  come to about the same);
- activations at the configured micro-batch and max_length (every row counted at max_length:
  the batch that must fit is the longest one), the LoRA branches' included: with dropout, PEFT
  keeps each targeted module's own dropout output and mask (Shape.lora_activation_bytes);
- the logits: the largest single activation at a 128k vocabulary, kept in the model's dtype plus
  fp32 for the loss (upcast, log-softmax kept for backward, its gradient).
Plus a fixed overhead (CUDA context, NCCL buffers) and a margin for allocator fragmentation.
An estimate, not a measurement: it decides which strategy to try and how many GPUs to ask for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from d2lora_dist.config import Experiment, ModelShapeConfig, TrainSettings
from d2lora_dist.errors import InputError

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES_PER_PARAM = 16  # value 4 + gradient 4 + Adam m and v 8 (fp32)
LOGIT_FP32_BYTES = 12  # fp32 upcast + log-softmax kept for backward + its gradient
OVERHEAD_BYTES = int(1.5 * GIB)  # CUDA context and NCCL buffers, before any tensor
FRAGMENTATION = 0.10  # the caching allocator rarely packs the last 10%
# CUDA's fused dropout keeps a bool mask for backward (1 byte per element); CPU dropout keeps its
# float noise instead (the activation's own size), which the tests pass in when they measure on CPU
DROPOUT_MASK_BYTES = 1
# Inputs of targeted modules that only LoRA's lora_A keeps for backward when there is no dropout (the
# frozen base linear keeps only its weight): counted in activation_elements_per_token, replaced by
# the dropout copies when there is dropout. The attention output (o_proj's input) is kept by attention.
_LORA_ONLY_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",))

# Shapes of hub models people run this with, so that planning needs neither the network nor the
# weights (the values are those models' config.json).
_LLAMA31_8B = ModelShapeConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=128256, num_attention_heads=32,
                               intermediate_size=14336, num_key_value_heads=8)
KNOWN_SHAPES: dict[str, ModelShapeConfig] = {
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShapeConfig(
        hidden_size=576, num_hidden_layers=30, vocab_size=49152, num_attention_heads=9, intermediate_size=1536,
        num_key_value_heads=3, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class Shape:
    """The decoder's dimensions (a Llama-style block: attention q/k/v/o, gated MLP gate/up/down)."""

    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @classmethod
    def of(cls, cfg: ModelShapeConfig) -> Shape:
        kv = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.num_attention_heads, kv, head_dim,
                   cfg.intermediate_size, cfg.tie_word_embeddings)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one layer, by its PEFT target name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden  # + two RMSNorms

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise InputError(f"lora.target_modules: {unknown} are not modules the memory estimate knows "
                             f"({', '.join(shapes)}); use launch.strategy null with a named accelerate config")
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def lora_activation_bytes(self, r: int, targets: list[str], dropout: float, size: int,
                              mask_bytes: int = DROPOUT_MASK_BYTES) -> int:
        """Bytes one layer's LoRA branches keep for backward per token, beyond activation_elements_per_token.

        PEFT computes lora_B(lora_A(dropout(x))): lora_B keeps lora_A's output (r values per module).
        With dropout > 0 every targeted module has its own dropout, so it keeps its own copy of its
        input (and the mask), where without dropout q/k/v (and gate/up) share one kept input, the
        normed hidden state that activation_elements_per_token already counts; that shared input
        is then no longer kept. Measured on the tiny Llama with saved_tensors_hooks (the tests).
        """
        shapes = self.linear_shapes()
        branch = r * len(targets) * size
        if dropout <= 0:
            return branch
        copies = sum(shapes[t][0] for t in targets) * (size + mask_bytes)
        replaced = sum(shapes[group[0]][0] for group in _LORA_ONLY_INPUTS if set(group) & set(targets)) * size
        return branch + copies - replaced

    def activation_elements_per_token(self) -> int:
        """Elements one layer keeps for backward per token (sdpa/flash attention: no seq x seq scores)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # two norm inputs + outputs, q/k/v, attention output; gate, up, act(gate), act(gate) * up
        return 4 * self.hidden + q + 2 * kv + q + 4 * self.intermediate


@dataclass(frozen=True)
class Workload:
    """What one rank holds activations for in one forward/backward pass."""

    per_device_batch_size: int
    sequences_per_example: int  # 2 for preference methods: chosen and rejected go through together
    max_length: int
    gradient_checkpointing: bool
    lora_dropout: float = 0.0  # > 0: every targeted module keeps its own dropout copy of its input

    @property
    def tokens(self) -> int:
        return self.per_device_batch_size * self.sequences_per_example * self.max_length


@dataclass(frozen=True)
class Sharding:
    """What a strategy divides over ranks or moves to the CPU."""

    weights: bool = False  # ZeRO-3: base weights and adapter values partitioned
    optimizer: bool = False  # ZeRO-2/3: gradients and optimizer states partitioned
    offload: bool = False  # weights and optimizer states live in CPU memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by part."""

    weights: int
    adapter: int
    activations: int
    logits: int
    overhead: int
    devices: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits + self.overhead

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "total_gib": round(self.total / GIB, 2)}

    def describe(self) -> str:
        parts = (("weights", self.weights), ("adapter+optimizer", self.adapter), ("activations", self.activations),
                 ("logits", self.logits), ("overhead", self.overhead))
        return f"{self.total / GIB:.1f} GiB (" + ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts) + ")"


def estimate(shape: Shape, dtype: str, lora_r: int, targets: list[str], work: Workload, sharding: Sharding,
             devices: int) -> MemoryEstimate:
    """Per-device bytes of a LoRA phase on `devices` ranks under `sharding`."""
    size = DTYPE_BYTES[dtype]
    weights = shape.params() * size
    adapter = shape.lora_params(lora_r, targets) * ADAPTER_BYTES_PER_PARAM
    if sharding.offload:
        # parameters are gathered onto the GPU a few modules at a time; the rest stay in CPU memory
        weights, adapter = _gather_buffer(shape, size), 0
    elif sharding.weights:
        weights, adapter = weights // devices + _gather_buffer(shape, size), adapter // devices
    elif sharding.optimizer:
        values = adapter // 4  # fp32 values stay replicated; gradients and moments are split
        adapter = values + (adapter - values) // devices
    layer_bytes = shape.activation_elements_per_token() * size + shape.lora_activation_bytes(
        lora_r, targets, work.lora_dropout, size)
    if work.gradient_checkpointing:  # one input per layer kept; one layer's activations rebuilt at a time
        activations = work.tokens * (shape.layers * shape.hidden * size + layer_bytes)
    else:
        activations = work.tokens * shape.layers * layer_bytes
    logits = work.tokens * shape.vocab * (size + LOGIT_FP32_BYTES)
    subtotal = weights + adapter + activations + logits
    return MemoryEstimate(weights, adapter, activations, logits,
                          OVERHEAD_BYTES + int(FRAGMENTATION * subtotal), devices)


def _gather_buffer(shape: Shape, size: int) -> int:
    # ZeRO-3 gathers a layer while prefetching the next; the embedding or LM head is the largest single gather
    return max(2 * shape.layer_params(), shape.vocab * shape.hidden) * size


def workload(exp: Experiment, settings: TrainSettings, method: str) -> Workload:
    from d2lora_dist.methods import get_method

    pairs = 2 if get_method(method).form == "preference" else 1
    dropout = exp.lora.dropout if settings.lora_dropout is None else settings.lora_dropout  # as train.phase_lora
    return Workload(settings.per_device_batch_size, pairs, settings.max_length, exp.model.gradient_checkpointing,
                    dropout)


def model_shape(exp: Experiment) -> ModelShapeConfig:
    """launch.model_shape, else the model's local config.json, else a known hub shape; never the network."""
    if exp.launch.model_shape is not None:
        return exp.launch.model_shape
    local = _local_config(exp.model.name_or_path)
    if local is not None:
        return _shape_from_config(local, exp.model.name_or_path)
    if exp.model.name_or_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[exp.model.name_or_path]
    raise InputError(f"model.name_or_path: no config.json for {exp.model.name_or_path!r} on this machine and its "
                     "shape is not known, so the memory estimate cannot be made; set launch.model_shape "
                     "(hidden_size, num_hidden_layers, vocab_size, num_attention_heads, intermediate_size, "
                     "num_key_value_heads: the values of the model's config.json)")


def _local_config(name: str) -> Path | None:
    """config.json of a local directory, an asset, or the HF cache (offline)."""
    from d2lora_dist.assets import resolve_asset_uri

    try:
        path = Path(resolve_asset_uri(name))
    except InputError:
        return None
    if (path / "config.json").is_file():
        return path / "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id: it is neither local nor cached
        return None
    return Path(cached) if isinstance(cached, str) else None


def _shape_from_config(path: Path, name: str) -> ModelShapeConfig:
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    try:
        return ModelShapeConfig(
            hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
            num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
            num_key_value_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise InputError(f"{path}: config.json of {name!r} has no {e.args[0]!r}; set launch.model_shape") from e
