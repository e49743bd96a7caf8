"""Base model and tokenizer loading, LoRA attachment and the base-model fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2lora_dist.config import LoraConfig, ModelConfig
from d2lora_dist.modeling import ModelError, attach_lora, base_fingerprint, load_base_model, load_tokenizer


def _cfg(path: Path, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(name_or_path=str(path), dtype=dtype, attn_implementation="sdpa")


def test_the_base_loads_frozen_and_a_fresh_lora_starts_at_zero(tiny_model_dir: Path) -> None:
    model = attach_lora(load_base_model(_cfg(tiny_model_dir), training=True),
                        LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not torch.count_nonzero(p) for n, p in trainable.items() if "lora_B" in n)
    assert all(torch.count_nonzero(p) for n, p in trainable.items() if "lora_A" in n)


def test_a_state_that_does_not_fit_the_lora_shape_is_refused(tiny_model_dir: Path) -> None:
    base = load_base_model(_cfg(tiny_model_dir), training=True)
    state = {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(ModelError, match="adapter does not fit the model"):
        attach_lora(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), state)


def test_bf16_on_cpu_and_a_tokenizer_without_chat_template_stop_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU dtype rule only applies without CUDA")
    with pytest.raises(ModelError, match="model.dtype: bfloat16 on CPU"):
        load_base_model(_cfg(tiny_model_dir, "bfloat16"), training=False)
    tokenizer = load_tokenizer(_cfg(tiny_model_dir))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelError, match="has no chat template"):
        load_tokenizer(_cfg(tmp_path / "plain"))


def test_the_fingerprint_tells_other_weights_of_the_same_architecture_apart(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    from tests.evaluate_fixtures import build_tiny_llama, build_tiny_tokenizer

    other = tmp_path / "other"
    build_tiny_llama(build_tiny_tokenizer(), seed=1).save_pretrained(other)
    mine, theirs = base_fingerprint(_cfg(tiny_model_dir)), base_fingerprint(_cfg(other))
    assert mine["config_sha256"] == theirs["config_sha256"]
    assert mine["weights_fingerprint"] != theirs["weights_fingerprint"]
    assert base_fingerprint(_cfg(tiny_model_dir)) == mine
