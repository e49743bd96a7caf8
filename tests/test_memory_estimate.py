"""The memory estimate against numbers counted by hand, and against the shapes of real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.config import ModelShapeConfig, experiment_from_dict
from d2lora_dist.errors import InputError
from d2lora_dist.memory_estimate import (
    GIB,
    KNOWN_SHAPES,
    OVERHEAD_BYTES,
    Shape,
    Sharding,
    Workload,
    estimate,
    model_shape,
)

# hidden 8, 2 layers, vocab 16, 2 query heads of 4, 1 key/value head, MLP 12, untied
TINY = Shape.of(ModelShapeConfig(hidden_size=8, num_hidden_layers=2, vocab_size=16, num_attention_heads=2,
                                 intermediate_size=12, num_key_value_heads=1))
WORK = Workload(per_device_batch_size=2, sequences_per_example=1, max_length=4, gradient_checkpointing=False)


def test_parameters_and_lora_of_a_tiny_shape_by_hand() -> None:
    # q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x12, down 12x8, two norms of 8
    layer = 64 + 32 + 32 + 64 + 96 + 96 + 96 + 16
    assert TINY.layer_params() == layer == 496
    assert TINY.params() == 16 * 8 * 2 + 2 * layer + 8 == 1256  # embedding + LM head, layers, final norm
    # r 2 on q (8 in, 8 out) and v (8 in, 4 out), two layers
    assert TINY.lora_params(2, ["q_proj", "v_proj"]) == 2 * (2 * (8 + 8) + 2 * (8 + 4)) == 112


def test_estimate_of_a_tiny_shape_by_hand() -> None:
    est = estimate(TINY, "float32", 2, ["q_proj", "v_proj"], WORK, Sharding(), devices=1)
    assert est.weights == 1256 * 4
    assert est.adapter == 112 * 16  # value, gradient, two Adam moments, fp32
    # 8 tokens x 2 layers x (4 x hidden + q + 2 kv + attention output + 4 x intermediate + the r = 2
    # lora_A outputs of q and v) floats
    assert est.activations == 8 * 2 * (4 * 8 + 8 + 2 * 4 + 8 + 4 * 12 + 2 * 2) * 4 == 6912
    assert est.logits == 8 * 16 * (4 + 12)  # float32 logits plus the fp32 loss buffers
    subtotal = 5024 + 1792 + 6912 + 2048
    assert est.overhead == OVERHEAD_BYTES + int(0.1 * subtotal) and est.total == subtotal + est.overhead

    checkpointed = estimate(TINY, "float32", 2, ["q_proj", "v_proj"],
                            Workload(2, 1, 4, gradient_checkpointing=True), Sharding(), devices=1)
    assert checkpointed.activations == 8 * (2 * 8 + 108) * 4  # one input per layer + one layer rebuilt

    zero2 = estimate(TINY, "float32", 2, ["q_proj", "v_proj"], WORK, Sharding(optimizer=True), devices=2)
    assert (zero2.weights, zero2.adapter) == (5024, 448 + 1344 // 2)  # values replicated, the rest split
    zero3 = estimate(TINY, "float32", 2, ["q_proj", "v_proj"], WORK, Sharding(weights=True, optimizer=True), 2)
    assert zero3.weights == 5024 // 2 + 2 * 496 * 4  # a shard + two layers gathered
    assert zero3.adapter == 1792 // 2
    offload = estimate(TINY, "float32", 2, ["q_proj", "v_proj"], WORK,
                       Sharding(weights=True, optimizer=True, offload=True), 2)
    assert (offload.weights, offload.adapter) == (2 * 496 * 4, 0)


def test_llama_31_8b_in_bf16_is_16_gb_of_weights() -> None:
    shape = Shape.of(KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"])
    assert shape.params() == 8_030_261_248  # the model card's 8.03B
    assert shape.lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) \
        == 41_943_040  # what PEFT reports for r 16 on all linear layers
    est = estimate(shape, "bfloat16", 16, ["q_proj"], Workload(1, 1, 1, True), Sharding(), 1)
    assert 16.0e9 < est.weights < 16.1e9 and est.weights / GIB == pytest.approx(14.96, abs=0.01)


def test_the_shape_comes_from_config_json_then_the_setting_then_known_shapes(tiny_experiment: dict,
                                                                              tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    got = model_shape(experiment_from_dict(tiny_experiment))
    assert (got.hidden_size, got.num_hidden_layers, got.vocab_size) == (
        config["hidden_size"], config["num_hidden_layers"], config["vocab_size"])
    tiny_experiment["model"]["name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"  # not local: the built-in shape
    assert model_shape(experiment_from_dict(tiny_experiment)).hidden_size == 4096
    tiny_experiment["model"]["name_or_path"] = "someone/unknown-model"
    with pytest.raises(InputError, match="set launch.model_shape"):
        model_shape(experiment_from_dict(tiny_experiment))
    tiny_experiment["launch"] = {"model_shape": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
                                                 "num_attention_heads": 4, "intermediate_size": 128}}
    assert Shape.of(model_shape(experiment_from_dict(tiny_experiment))).kv_heads == 4


def test_targets_the_estimate_does_not_know_are_named() -> None:
    with pytest.raises(InputError, match=r"lora.target_modules: \['c_attn'\]"):
        TINY.lora_params(2, ["q_proj", "c_attn"])


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_activation_bytes(dropout: float, batch: int, length: int) -> tuple[int, Shape]:
    """Bytes autograd keeps for backward after one training forward of a tiny Llama with LoRA r 4 on
    every linear module (parameters left out), counted with saved_tensors_hooks, each storage once."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                       target_modules=ALL_LINEAR))
    model.train()
    model.enable_input_require_grads()  # every layer's input needs a gradient, as in the Trainer's runs
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=torch.randint(0, 96, (batch, length)))
    assert out.logits.requires_grad
    shape = Shape.of(ModelShapeConfig(hidden_size=64, num_hidden_layers=2, vocab_size=96, num_attention_heads=4,
                                      intermediate_size=160, num_key_value_heads=2))
    return sum(kept.values()), shape


def test_lora_dropout_copies_are_counted_as_autograd_keeps_them() -> None:
    """PEFT's lora_B(lora_A(dropout(x))) keeps one dropout output (and mask) per targeted module: more
    than the one shared input q/k/v (gate/up) keep without dropout. The estimate's activations are the
    bytes measured, the dropout's share exactly (on CPU the mask is float noise: the activation's size)."""
    batch, length, tokens = 2, 24, 48
    without, shape = saved_activation_bytes(0.0, batch, length)
    with_dropout, _ = saved_activation_bytes(0.1, batch, length)
    extra = shape.lora_activation_bytes(4, ALL_LINEAR, 0.1, 4, mask_bytes=4) - shape.lora_activation_bytes(
        4, ALL_LINEAR, 0.0, 4, mask_bytes=4)
    # per layer and token: 7 inputs (6 x 64 + 160) copied with their noise, the 3 shared inputs (64, 64, 160) not kept
    assert extra == (6 * 64 + 160) * 8 - (64 + 64 + 160) * 4
    assert with_dropout - without == tokens * shape.layers * extra
    assert with_dropout > 1.4 * without  # the share the estimate missed

    def estimated(dropout: float) -> int:
        # the GPU estimate's activations, with the CPU mask size
        per_layer = shape.activation_elements_per_token() * 4 + shape.lora_activation_bytes(4, ALL_LINEAR, dropout, 4,
                                                                                            mask_bytes=4)
        return tokens * shape.layers * per_layer

    # the rest (norms, attention, MLP) as counted, to within the final norm's few vectors
    assert estimated(0.0) == pytest.approx(without, rel=0.08)
    assert estimated(0.1) == pytest.approx(with_dropout, rel=0.05)
    work = Workload(batch, 1, length, gradient_checkpointing=False, lora_dropout=0.1)
    assert estimate(shape, "float32", 4, ALL_LINEAR, work, Sharding(), 1).activations == tokens * shape.layers * (
        shape.activation_elements_per_token() * 4 + shape.lora_activation_bytes(4, ALL_LINEAR, 0.1, 4))


def test_with_checkpointing_dropout_copies_are_held_for_one_layer() -> None:
    plain, dropped = (Workload(2, 1, 4, gradient_checkpointing=True, lora_dropout=p) for p in (0.0, 0.1))
    base = estimate(TINY, "bfloat16", 2, ["q_proj", "v_proj"], plain, Sharding(), 1).activations
    more = estimate(TINY, "bfloat16", 2, ["q_proj", "v_proj"], dropped, Sharding(), 1).activations
    # 8 tokens, one rebuilt layer: q's and v's inputs (8 each) copied in bf16 with a bool mask, less the shared one
    assert more - base == 8 * ((8 + 8) * (2 + 1) - 8 * 2)
