"""Plain DDP on 2 CPU ranks (gloo): warm-up, SFT, DPO, ORPO in one launch, and `d2lora eval`
sharded over 2 ranks equal to one process, item by item."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from d2lora_dist import adapters
from d2lora_dist.layout import RunLayout
from tests.conftest import write_experiment
from tests.dist_scripts.launching import (
    CLI,
    PHASES_SCRIPT,
    assert_same_predictions,
    experiment_dict,
    launch,
    read_jsonl,
    run,
)

pytestmark = pytest.mark.distributed
DDP = "cpu_2proc_ddp.yaml"


@pytest.fixture(scope="module")
def ddp(tiny_model_dir: Path, tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from d2lora_dist.config import load_experiment

    root = tmp_path_factory.mktemp("ddp")
    path = write_experiment(experiment_dict(tiny_model_dir, tiny_data, root), root / "exp.yaml")
    out = root / "probe"
    result = run(launch(DDP, [PHASES_SCRIPT, "-c", str(path), "--out", str(out), "--warmup",
                              "--phases", "sft,dpo:init,orpo"]), root / "phases.log")
    exp = load_experiment(path)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)] if result.code == 0 else []
    return SimpleNamespace(root=root, config=path, exp=exp, layout=RunLayout(exp.run_dir), result=result,
                           out=out, ranks=ranks)


def test_ddp_warmup_and_phase2_keep_the_ranks_in_sync(ddp) -> None:
    assert ddp.result.code == 0, ddp.result.tail()
    assert "[distributed] ddp: 2 ranks, backend gloo, DistributedType.MULTI_CPU" in ddp.result.log
    assert "global batch 4 = 2 per device x 1 accumulation x 2 ranks" in ddp.result.log
    adapters.verify_adapter(ddp.layout.warmup_adapter)
    assert ddp.ranks[0]["broadcast"]["checksum"] == ddp.ranks[1]["broadcast"]["checksum"]
    by_phase = [{p["phase"]: p for p in report["phases"]} for report in ddp.ranks]
    assert sorted(by_phase[0]) == ["dpo-init", "orpo-default", "sft-default"]
    for name, phase in by_phase[0].items():
        # Each rank trained on its own half of the batch: equal weights afterwards prove the
        # gradients were all-reduced (a world of unsynchronised copies would differ). Bit for bit:
        # every rank applies the same optimizer step to the same all-reduced gradient.
        assert phase["trained_checksum"] == by_phase[1][name]["trained_checksum"], name
        assert phase["model_in_training"][0] == phase["model_in_training"][1]  # DDP: a full replica
        assert phase["steps"] == phase["max_steps"] == 1
        assert phase["find_unused_parameters"] is False, name  # every trainable LoRA weight is used
        adapters.verify_adapter(ddp.out / name / "adapter")
    dpo = by_phase[0]["dpo-init"]
    assert dpo["ref_model_is_none"] and dpo["adapters"] == ["default", "ref"]
    assert dpo["first_loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_eval_command_on_two_ranks_equals_one_process(ddp) -> None:
    assert ddp.result.code == 0, "the DDP launch failed; see test_ddp_warmup_and_phase2_keep_the_ranks_in_sync"
    two = ddp.root / "eval-2"
    result = run(launch(DDP, [*CLI, "eval", "-c", str(ddp.config), "--adapter", str(ddp.layout.warmup_adapter),
                              "--task", "math", "--out", str(two)]), ddp.root / "eval.log")
    assert result.code == 0, result.tail()
    from d2lora_dist.evaluate.adapter_eval import evaluate_suites

    one = ddp.root / "eval-1"
    evaluate_suites(ddp.exp, "math", ["gsm8k", "arc_easy"], ddp.layout.warmup_adapter,
                    lambda suite: one / f"{suite}.jsonl", progress=False)
    for suite in ("gsm8k", "arc_easy"):
        assert_same_predictions(read_jsonl(two / f"{suite}.jsonl"), read_jsonl(one / f"{suite}.jsonl"), suite)
