"""PiSSA under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), one launch of tests/dist_scripts/lora_inits.py.

The main process computes the factors once; both ranks start from the same adapter and the same residual
base weights (gathered checksums), equal to the one-process PiSSA model built from the cached factors
and to PEFT's own in-model PiSSA; training runs and the saved adapter's manifest names the residual.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2lora_dist import adapters, residual
from d2lora_dist.config import load_experiment
from d2lora_dist.modeling import (
    attach_lora,
    base_fingerprint,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
)
from tests.closeness import relative_difference
from tests.conftest import write_experiment
from tests.dist_scripts.launching import experiment_dict, launch, run

pytestmark = pytest.mark.distributed
ZERO3 = "cpu_2proc_zero3.yaml"
SCRIPT = "tests/dist_scripts/lora_inits.py"


def _logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_pissa_under_zero3_starts_every_rank_from_the_one_process_residual(
        tiny_model_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    from peft import get_peft_model

    path = write_experiment(experiment_dict(tiny_model_dir, tiny_data, tmp_path), tmp_path / "exp.yaml")
    out = tmp_path / "probe"
    result = run(launch(ZERO3, [SCRIPT, "-c", str(path), "--out", str(out)]), tmp_path / "zero3.log")
    assert result.code == 0, result.tail()
    assert "[distributed] deepspeed: 2 ranks, backend gloo" in result.log
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["computed"] for r in ranks] == [1, 0]  # the main process computed, once
    assert ranks[0]["adapter"] == ranks[1]["adapter"] and ranks[0]["residual"] == ranks[1]["residual"]
    assert [r["steps"] for r in ranks] == [2, 2]

    exp = load_experiment(path)
    [artifact] = list((exp.run_dir / "lora_inits").iterdir())  # one artifact, no temporary leftovers
    manifest = adapters.verify_adapter(out / "sft-pissa" / "adapter")
    assert manifest["lora_init"]["name"] == "pissa" and manifest["lora_init"]["residual"]["path"] == str(artifact)

    # One process, from the same cached factors: the same adapter, residual weights and logits.
    res = residual.prepare_residual(exp, "pissa", 0, base_fingerprint(exp.model))
    assert res.ref == manifest["lora_init"]["residual"]
    model = attach_lora(load_base_model(exp.model, training=False), exp.lora, None, "pissa", res)
    assert adapters.state_checksum(adapters.gathered_state_dict(model)) == ranks[0]["adapter"]
    start = torch.load(out / "start.pt")
    one = {n: p.detach() for n, p in model.named_parameters() if "base_layer" in n}
    assert sorted(one) == sorted(start["residual"]) and len(one) == 4
    # the residual is computed on the CPU by one expression under any launch (residual.apply_residual), and
    # the models below hold the same weights as the ranks' (PEFT's own init bit for bit, test_lora_inits.py):
    # the same operations on the same inputs, so these bounds do not absorb another summation order
    for name, weight in one.items():
        torch.testing.assert_close(start["residual"][name], weight, rtol=0, atol=1e-6, msg=name)
    tokenizer = load_tokenizer(exp.model)
    torch.testing.assert_close(start["logits"], _logits(model, tokenizer, start["texts"]), rtol=1e-5, atol=1e-5)
    peft_own = get_peft_model(load_base_model(exp.model, training=False), peft_lora_config(exp.lora, "pissa"))
    torch.testing.assert_close(start["logits"], _logits(peft_own, tokenizer, start["texts"]), rtol=1e-5, atol=1e-5)
    # PiSSA starts at the base model up to float32 rounding of (W - sBA) + sBA, a fraction of the logits'
    # scale (|logit| up to ~15; measured 3e-7 of their norm): norm-relative (tests/closeness.py)
    base = _logits(load_base_model(exp.model, training=False), tokenizer, start["texts"])
    assert relative_difference(start["logits"], base) < 1e-5
