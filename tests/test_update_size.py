"""Update sizes of a LoRA phase: Gram-matrix norms against explicit products, lazy base weight
norms against the model's own weights, phase_rel against PEFT's ΔW on a real tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from d2lora_dist import update_size
from d2lora_dist.config import LoraConfig
from d2lora_dist.update_size import (
    UpdateSizeError,
    adapted_modules,
    base_weight_norms,
    lora_scaling,
    lowrank_diff_norm,
    lowrank_norm,
    measure_update,
)

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
SCALING = lora_scaling(LORA.alpha, LORA.r)


def _explicit(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.double() @ a.double()


# ---------------------------------------------------------------- Gram-matrix norms


def test_lowrank_norm_equals_norm_of_explicit_product() -> None:
    gen = torch.Generator().manual_seed(0)
    for out, r, inp in [(48, 4, 32), (7, 16, 300), (1, 1, 1)]:
        b, a = torch.randn(out, r, generator=gen), torch.randn(r, inp, generator=gen)
        assert lowrank_norm(b, a) == pytest.approx(float(torch.linalg.norm(_explicit(b, a))), rel=1e-12)


def test_lowrank_diff_norm_equals_norm_of_explicit_difference() -> None:
    gen = torch.Generator().manual_seed(1)
    b0, a0 = torch.randn(64, 8, generator=gen), torch.randn(8, 40, generator=gen)
    b1, a1 = torch.randn(64, 8, generator=gen), torch.randn(8, 40, generator=gen)
    expected = torch.linalg.norm(_explicit(b1, a1) - _explicit(b0, a0))
    assert lowrank_diff_norm(b1, a1, b0, a0) == pytest.approx(float(expected), rel=1e-12)
    assert lowrank_diff_norm(b0, a0, b0, a0) == 0.0


def test_lowrank_diff_norm_keeps_a_tiny_change_of_a_large_adapter() -> None:
    """A 1e-9 relative move of a warm-up adapter: stacking [B_end, −B_start] would cancel it away."""
    gen = torch.Generator().manual_seed(2)
    b0, a0 = torch.randn(64, 8, generator=gen).double(), torch.randn(8, 40, generator=gen).double()
    b1 = b0 + 1e-9 * torch.randn(64, 8, generator=gen).double()
    a1 = a0 + 1e-9 * torch.randn(8, 40, generator=gen).double()
    expected = float(torch.linalg.norm(b1 @ a1 - b0 @ a0))
    assert expected > 0
    assert lowrank_diff_norm(b1, a1, b0, a0) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- base weight norms


def _model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _expected_norms(model: Any, modules: list[str]) -> dict[str, float]:
    weights = dict(model.named_parameters())
    return {m: float(torch.linalg.norm(weights[f"{m}.weight"].detach().double())) for m in modules}


TINY_MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")]


def test_base_weight_norms_match_the_model_single_file_and_sharded(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tiny_model_dir)
    expected = _expected_norms(model, TINY_MODULES + ["lm_head"])
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    monkeypatch.setattr(update_size, "_BLOCK_ELEMENTS", 1000)  # several blocks of rows per tensor
    for directory in (tiny_model_dir, sharded):
        norms = base_weight_norms(directory, TINY_MODULES + ["lm_head"])
        assert norms.keys() == expected.keys()
        for module, value in expected.items():
            assert norms[module] == pytest.approx(value, rel=1e-6), (directory, module)


def test_base_weight_norms_names_the_missing_key_and_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UpdateSizeError, match=r"model\.safetensors: no tensor model\.layers\.9\.mlp\.up_proj\.weight"):
        base_weight_norms(tiny_model_dir, ["model.layers.0.self_attn.q_proj", "model.layers.9.mlp.up_proj"])
    sharded = tmp_path / "sharded"
    _model(tiny_model_dir).save_pretrained(sharded, max_shard_size="60KB")
    with pytest.raises(UpdateSizeError, match=r"index\.json: no tensor model\.layers\.9\.mlp\.up_proj\.weight"):
        base_weight_norms(sharded, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(UpdateSizeError, match="neither model.safetensors"):
        base_weight_norms(tmp_path, ["model.layers.0.self_attn.q_proj"])


# ---------------------------------------------------------------- a real tiny model with PEFT LoRA


def _peft_model(model_dir: Path) -> Any:
    from d2lora_dist.modeling import attach_lora

    return attach_lora(_model(model_dir), LORA)


def _state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _lora_layers(model: Any) -> dict[str, Any]:
    """PEFT LoRA layers by module name (`model.layers.0.self_attn.q_proj`)."""
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})}


def _perturb(model: Any, a_scale: float, b_scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            for weight, scale in ((layer.lora_A["default"].weight, a_scale), (layer.lora_B["default"].weight, b_scale)):
                weight.add_(scale * torch.randn(weight.shape, generator=gen))


def _delta_weights(model: Any) -> dict[str, torch.Tensor]:
    return {m: layer.get_delta_weight("default").detach().double().clone() for m, layer in _lora_layers(model).items()}


@pytest.fixture
def warm_model(tiny_model_dir: Path) -> Any:
    """A LoRA model whose adapter is already non-zero (a warm-up adapter, B ≠ 0)."""
    model = _peft_model(tiny_model_dir)
    _perturb(model, a_scale=0.0, b_scale=0.05, seed=0)
    return model


def test_phase_rel_and_total_rel_equal_explicit_delta_w_of_the_model(warm_model: Any, tiny_model_dir: Path) -> None:
    start, delta_start = _state(warm_model), _delta_weights(warm_model)
    _perturb(warm_model, a_scale=0.02, b_scale=0.03, seed=1)
    end, delta_end = _state(warm_model), _delta_weights(warm_model)
    modules = adapted_modules(end)
    assert modules == sorted(_lora_layers(warm_model)) and len(modules) == 4
    norms = base_weight_norms(tiny_model_dir, modules)
    size = measure_update(start, end, SCALING, norms)
    for row in size.modules:
        w = _lora_layers(warm_model)[row.module].base_layer.weight.double()
        assert norms[row.module] == pytest.approx(float(torch.linalg.norm(w)), rel=1e-6)
        phase = float(torch.linalg.norm(delta_end[row.module] - delta_start[row.module]) / torch.linalg.norm(w))
        total = float(torch.linalg.norm(delta_end[row.module]) / torch.linalg.norm(w))
        assert 1e-3 < phase < total
        assert row.phase_rel == pytest.approx(phase, rel=1e-4), row.module
        assert row.total_rel == pytest.approx(total, rel=1e-4), row.module
    assert size.phase_rel_max == pytest.approx(max(r.phase_rel for r in size.modules))
    assert size.phase_rel_max_module == max(size.modules, key=lambda r: r.phase_rel).module


def test_fresh_lora_reports_absolute_change_of_b_and_phase_equals_total(tiny_model_dir: Path) -> None:
    model = _peft_model(tiny_model_dir)
    start = _state(model)
    assert all(not v.any() for k, v in start.items() if "lora_B" in k)
    _perturb(model, a_scale=0.01, b_scale=0.02, seed=2)
    end = _state(model)
    size = measure_update(start, end, SCALING, base_weight_norms(tiny_model_dir, adapted_modules(end)))
    for module, row in size.to_dict()["modules"].items():
        b_key = f"base_model.model.{module}.lora_B.weight"
        a_key = f"base_model.model.{module}.lora_A.weight"
        assert "lora_B_rel_change" not in row
        assert row["lora_B_abs_change"] == pytest.approx(float(torch.linalg.norm(end[b_key])), rel=1e-3)
        rel_a = float(torch.linalg.norm(end[a_key] - start[a_key]) / torch.linalg.norm(start[a_key]))
        assert row["lora_A_rel_change"] == pytest.approx(rel_a, rel=1e-3)
        assert row["phase_rel"] == row["total_rel"]


def test_zero_update_warns_and_a_large_update_does_not(warm_model: Any, tiny_model_dir: Path) -> None:
    start = _state(warm_model)
    norms = base_weight_norms(tiny_model_dir, adapted_modules(start))
    still = measure_update(start, _state(warm_model), SCALING, norms)
    assert still.phase_rel_max == 0.0
    message = still.warning(1e-3)
    assert message is not None
    assert "below update_warning_below=0.001" in message and "learning rate" in message
    assert "lora_A of 4 of 4 modules is bit-identical" in message
    assert "lora_B of 4 of 4 modules is bit-identical" in message

    _perturb(warm_model, a_scale=0.05, b_scale=0.05, seed=3)
    moved = measure_update(start, _state(warm_model), SCALING, norms)
    assert moved.phase_rel_max > 1e-2
    assert moved.warning(1e-3) is None
    assert moved.warning(10.0) is not None  # the threshold is the experiment's, not a constant


def test_small_update_below_threshold_warns_with_the_size(warm_model: Any, tiny_model_dir: Path) -> None:
    start = _state(warm_model)
    _perturb(warm_model, a_scale=1e-6, b_scale=1e-6, seed=4)
    size = measure_update(start, _state(warm_model), SCALING, base_weight_norms(tiny_model_dir, adapted_modules(start)))
    assert 0 < size.phase_rel_max < 1e-3
    message = size.warning(1e-3)
    assert message is not None and f"{size.phase_rel_max:.3g}" in message
    assert "bit-identical" not in message


def test_bit_identical_tensors_are_counted(warm_model: Any, tiny_model_dir: Path) -> None:
    """Only lora_B trained, and a tiny update rounded away by saving in bfloat16."""
    start = _state(warm_model)
    with torch.no_grad():
        for layer in _lora_layers(warm_model).values():
            layer.lora_B["default"].weight.mul_(1.5)
    end = _state(warm_model)
    norms = base_weight_norms(tiny_model_dir, adapted_modules(start))
    size = measure_update(start, end, SCALING, norms)
    assert (size.identical_count("lora_A"), size.identical_count("lora_B")) == (4, 0)
    assert size.to_dict()["summary"]["identical_tensors"] == 4
    assert size.to_dict()["summary"]["lora_tensors"] == 8
    assert all(row["lora_A_identical"] and not row["lora_B_identical"] for row in size.to_dict()["modules"].values())
    message = size.warning(1e-3)
    assert message is not None and "lora_A of 4 of 4 modules is bit-identical to its start" in message
    assert "lora_B of" not in message

    one_ulp = {k: torch.nextafter(v, torch.full_like(v, math.inf)) if "lora_A" in k else v for k, v in end.items()}
    nudged = measure_update(start, one_ulp, SCALING, norms)
    assert nudged.identical_count("lora_A") == 0  # one ulp is a change, however small

    coarse_start = {k: v.to(torch.bfloat16) for k, v in start.items()}
    coarse_end = {k: (v.double() * (1 + 1e-5)).to(torch.bfloat16) for k, v in coarse_start.items()}
    coarse = measure_update(coarse_start, coarse_end, SCALING, norms)
    assert coarse.identical_count() == 8 and coarse.phase_rel_max == 0.0


# ---------------------------------------------------------------- outputs and errors


def _random_states(modules: int = 3, seed: int = 5) -> tuple[dict, dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    start, end, norms = {}, {}, {}
    for i in range(modules):
        name = f"model.layers.{i}.mlp.down_proj"
        a, b = torch.randn(4, 16, generator=gen), torch.zeros(24, 4)
        start[f"base_model.model.{name}.lora_A.weight"], start[f"base_model.model.{name}.lora_B.weight"] = a, b
        end[f"base_model.model.{name}.lora_A.weight"] = a + 0.1 * torch.randn(4, 16, generator=gen)
        end[f"base_model.model.{name}.lora_B.weight"] = (i + 1) * 0.01 * torch.randn(24, 4, generator=gen)
        norms[name] = 10.0
    return start, end, norms


def test_to_dict_wandb_metrics_and_describe_are_compact_and_json_able() -> None:
    start, end, norms = _random_states()
    size = measure_update(start, end, 2.0, norms)
    data = json.loads(json.dumps(size.to_dict()))
    assert set(data) == {"summary", "modules"}
    assert set(data["summary"]) == {"phase_rel_max", "phase_rel_median", "phase_rel_max_module",
                                    "total_rel_max", "identical_tensors", "lora_tensors", "modules"}
    assert data["summary"]["phase_rel_max_module"] == "model.layers.2.mlp.down_proj"
    row = data["modules"]["model.layers.0.mlp.down_proj"]
    assert set(row) == {"phase_rel", "total_rel", "lora_A_rel_change", "lora_A_identical",
                        "lora_B_abs_change", "lora_B_identical"}
    for value in (data["summary"]["phase_rel_max"], row["phase_rel"], row["lora_A_rel_change"]):
        assert value == float(f"{value:.4g}") and value > 0
    exact = size.modules[0]
    assert row["phase_rel"] == pytest.approx(exact.phase_rel, rel=1e-3)
    assert data["summary"]["phase_rel_median"] == pytest.approx(size.modules[1].phase_rel, rel=1e-3)

    metrics = size.wandb_metrics()
    assert set(metrics) == {"update/phase_rel_max", "update/phase_rel_median", "update/total_rel_max",
                            "update/identical_tensors", "update/lora_tensors"}
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    line = size.describe("warmup")
    assert line.startswith("warmup: ") and "model.layers.2.mlp.down_proj" in line and "\n" not in line
    assert "0 of 6 LoRA tensors" in line


def test_scaling_multiplies_the_update() -> None:
    start, end, norms = _random_states()
    one, two = measure_update(start, end, 1.0, norms), measure_update(start, end, 2.0, norms)
    assert two.phase_rel_max == pytest.approx(2 * one.phase_rel_max)
    assert two.total_rel_max == pytest.approx(2 * one.total_rel_max)
    assert lora_scaling(16, 16) == 1.0 and lora_scaling(8, 4) == 2.0


def test_states_that_cannot_be_compared_name_the_problem() -> None:
    start, end, norms = _random_states()
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    with pytest.raises(UpdateSizeError, match="different tensors"):
        measure_update({k: v for k, v in start.items() if k != key}, end, 1.0, norms)
    with pytest.raises(UpdateSizeError, match=r"lora_A\.weight: start \(4, 16\), end \(4, 8\)"):
        measure_update(start, {**end, key: end[key][:, :8]}, 1.0, norms)
    with pytest.raises(UpdateSizeError, match="weight_norms has no key 'model.layers.1.mlp.down_proj'"):
        measure_update(start, end, 1.0, {k: v for k, v in norms.items() if "layers.1" not in k})
    with pytest.raises(UpdateSizeError, match="not lora_A/lora_B"):
        measure_update(start, {**end, "base_model.model.lm_head.lora_embedding_A": torch.zeros(2)}, 1.0, norms)
    with pytest.raises(UpdateSizeError, match="scaling must be positive"):
        measure_update(start, end, 0.0, norms)
    with pytest.raises(UpdateSizeError, match="empty"):
        measure_update({}, {}, 1.0, norms)
