"""Padding-free SFT batches: the same loss and update as padded ones, where the attention keeps rows apart.

Trained through train.train_phase (the registry's SFT trainer, TRL's collator) on the tiny Llama
with sdpa attention, the implementation CPUs use; rows of very different lengths in one micro-batch.
The two batchings sum the same terms in another order, so they are compared as tests/closeness.py
says: gradients and updates by norm-relative tolerance, trained with SGD.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from d2lora_dist import adapters
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.errors import InputError
from d2lora_dist.layout import RunLayout
from d2lora_dist.methods import resolve_batching
from d2lora_dist.schema import ConfigError
from d2lora_dist.train import Phase, train_phase
from tests.closeness import (
    SUMMATION_ORDER,
    StartAndGradients,
    assert_close_in_norm,
    assert_same_update,
    train_with_sgd,
)

LENGTHS = (1, 40, 3, 18, 60, 2, 9, 30)  # words per response: 8 rows, 2 micro-batches of 4


def _rows() -> list[dict[str, Any]]:
    words = "adapters learn small updates to frozen weights of language models".split()
    return [{"prompt": [{"role": "user", "content": f"Question {i}: say {n} words."}],
             "completion": [{"role": "assistant", "content": " ".join(words[j % len(words)] for j in range(n))}]}
            for i, n in enumerate(LENGTHS)]


@dataclass
class Trained:
    losses: list[float]  # per step: the first before any update, the rest after 1-3 of them
    tokens_seen: int
    gradients: list[dict[str, torch.Tensor]]  # per optimizer step, as the optimizer receives them
    start: dict[str, torch.Tensor]  # the adapter as training began
    end: dict[str, torch.Tensor]  # the saved adapter


def _train(tiny_experiment: dict, tmp_path: Path, batching: str, attn: str = "sdpa") -> Trained:
    data = {**tiny_experiment, "model": {**tiny_experiment["model"], "attn_implementation": attn}}
    exp = experiment_from_dict(data)
    settings = replace(exp.methods["sft"], batching=batching, per_device_batch_size=4, global_batch_size=4,
                       learning_rate=5e-2, max_length=256, epochs=2, logging_steps=1)
    root = RunLayout(exp.run_dir).root / f"{attn}-{batching}"
    recorded = StartAndGradients()
    phase = Phase(name=f"sft-{batching}", method="sft", settings=settings, settings_key="methods.sft",
                  records=_rows(), out_adapter=root / "adapter", checkpoint_dir=root / "ckpt", seed=0,
                  lineage={"phase": "adapt"}, callbacks=[recorded])
    outcome = train_phase(exp, phase)
    losses = [h["loss"] for h in outcome.log_history if "loss" in h]
    assert len(losses) == 4  # 2 epochs x 2 micro-batches: three of the four losses follow an update
    state, _ = adapters.load_adapter_state(phase.out_adapter)
    used = adapters.read_manifest(phase.out_adapter)["batching"]  # what ran, not only what was asked
    assert (used["requested"], used["used"], used["attention"]) == (batching, batching, attn)
    return Trained(losses, outcome.tokens_seen, recorded.gradients, recorded.start, state)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_batches_train_the_loss_and_update_of_padded_ones(tiny_experiment: dict, tmp_path: Path,
                                                                        attn: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    train_with_sgd(monkeypatch)  # an update linear in the gradient (tests/closeness.py: not Adam)
    padded = _train(tiny_experiment, tmp_path, "padded", attn)
    flat = _train(tiny_experiment, tmp_path, "padding_free", attn)
    # each loss is one float32 mean over hundreds of token losses: another summation order moves it ~1e-7 relative
    assert flat.losses == pytest.approx(padded.losses, rel=SUMMATION_ORDER)
    assert flat.tokens_seen == padded.tokens_seen  # a count of tokens, no rounding
    # the same gradient at every step, norm-relative (tests/closeness.py); lora_A's is zero at step 1 (lora_B
    # is), SGD keeps the later steps' weights within rounding of each other, so those gradients compare too
    assert len(flat.gradients) == len(padded.gradients) == 4
    for step, (got, expected) in enumerate(zip(flat.gradients, padded.gradients, strict=True), start=1):
        assert_close_in_norm(got, expected, what=f"gradients at step {step}")
    assert_close_in_norm(flat.start, padded.start, rtol=0.0, what="start")  # one seed: the same fresh LoRA
    assert_same_update(flat.end, padded.end, padded.start, steps=4)


def test_a_flattened_batch_whose_positions_do_not_restart_trains_another_loss(
        tiny_experiment: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above can fail: one position sequence over the joined rows (no packed-sequence mask,
    so each row attends to the rows before it, at shifted positions) gives another first loss, and a
    gradient and update outside the norm-relative tolerance."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    call = DataCollatorForLanguageModeling.torch_call

    def positions_run_on(self, examples):
        out = call(self, examples)
        if self.padding_free:
            out["position_ids"] = torch.arange(out["input_ids"].shape[1])[None]
        return out

    train_with_sgd(monkeypatch)
    padded = _train(tiny_experiment, tmp_path, "padded")
    monkeypatch.setattr(DataCollatorForLanguageModeling, "torch_call", positions_run_on)
    broken = _train(tiny_experiment, tmp_path, "padding_free")
    assert broken.losses[0] != pytest.approx(padded.losses[0], rel=SUMMATION_ORDER)
    with pytest.raises(AssertionError, match="above"):
        assert_close_in_norm(broken.gradients[0], padded.gradients[0])
    with pytest.raises(AssertionError, match="above"):
        assert_same_update(broken.end, padded.end, padded.start, steps=4)


def test_auto_uses_padding_free_for_sft_only_where_it_is_correct() -> None:
    assert resolve_batching("sft", "auto", 4, "sdpa").used == "padding_free"
    assert resolve_batching("sft", "auto", 4, "flash_attention_2").used == "padding_free"
    assert resolve_batching("sft", "padded", 4, "sdpa").used == "padded"
    for method, per_device, attn, why in (("dpo", 4, "sdpa", "DPO trainer always pads"),
                                          ("orpo", 4, "sdpa", "ORPO trainer always pads"),
                                          ("sft", 4, "flex_attention", "does not keep flattened rows apart"),
                                          ("sft", 1, "sdpa", "one row per micro-batch")):
        choice = resolve_batching(method, "auto", per_device, attn)
        assert (choice.used, choice.requested) == ("padded", "auto") and why in choice.reason
    with pytest.raises(InputError, match="padding_free is not correct for sft.*flex_attention"):
        resolve_batching("sft", "padding_free", 4, "flex_attention")


def test_padding_free_for_a_method_that_always_pads_is_refused_by_its_key(tiny_experiment: dict) -> None:
    tiny_experiment["methods"]["dpo"]["batching"] = "padding_free"
    tiny_experiment["methods"]["sft"]["batching"] = "padding_free"
    with pytest.raises(ConfigError, match=r"methods\.dpo\.batching: padding_free is not supported by TRL's DPO") as e:
        experiment_from_dict(tiny_experiment)
    assert "methods.sft" not in str(e.value)
