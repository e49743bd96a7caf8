"""LoRA inits on the tiny model: PEFT's value for fresh adapters; PiSSA/OLoRA factors computed once, cached,
equal to PEFT's own in-model init; residual adapters that reload exactly, warm-start on their parent's
residual, refuse `reference: base`, and leave a shared base as it was."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from d2lora_dist import adapters, residual
from d2lora_dist.base_cache import SharedBase
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.data.selection import task_records
from d2lora_dist.evaluate.adapter_eval import loaded_for_eval
from d2lora_dist.fileio import sha256_file
from d2lora_dist.methods import get_method
from d2lora_dist.modeling import (
    attach_lora,
    base_fingerprint,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
)
from d2lora_dist.schema import ConfigError
from d2lora_dist.train import Phase, train_phase
from tests.closeness import relative_difference
from tests.conftest import tiny_experiment_dict

TEXTS = ["Sam has 3 apples and buys 4 more. How many now?", "Name a number bigger than 5."]


def _phase(exp, name: str, method: str, lora_init: str, init_adapter: Path | None = None, **kw) -> Phase:
    records, _ = task_records(exp, "math", get_method(method).form, 4, 0)
    return Phase(name=name, method=method, settings=exp.methods[method], settings_key=f"methods.{method}",
                 records=records, out_adapter=exp.run_dir / name / "adapter",
                 checkpoint_dir=exp.run_dir / name / "ckpt", seed=0, lineage={"phase": "adapt"},
                 init_adapter=init_adapter, lora_init=lora_init, **kw)


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    return out.detach().cpu()


class CaptureLogits(TrainerCallback):
    """The trained model's logits, as the trainer holds it at the end of training."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.logits = tokenizer, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.logits = _logits(model, self.tokenizer)


def test_default_and_gaussian_are_drawn_by_peft_and_the_seed(tiny_experiment: dict) -> None:
    from transformers import set_seed

    exp = experiment_from_dict(tiny_experiment)
    drawn = {}
    for init, seed in (("gaussian", 0), ("gaussian", 0), ("gaussian", 1), ("default", 0)):
        set_seed(seed)
        model = attach_lora(load_base_model(exp.model, training=True), exp.lora, lora_init=init)
        assert model.peft_config["default"].init_lora_weights == (True if init == "default" else init)
        a = next(p for n, p in model.named_parameters() if "q_proj.lora_A" in n).detach().clone()
        assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
        drawn.setdefault(init, []).append(a)
    gaussian, default = drawn["gaussian"], drawn["default"][0]
    assert torch.equal(gaussian[0], gaussian[1]) and not torch.equal(gaussian[0], gaussian[2])
    assert 0.2 < gaussian[0].std() < 0.3 and default.std() < 0.1  # N(0, 1/r), r = 4; Kaiming bound 1/8
    with pytest.raises(ValueError, match="rewrites the base weights"):
        attach_lora(load_base_model(exp.model, training=True), exp.lora, lora_init="pissa")


def test_factors_are_computed_once_per_key_and_reused(tiny_experiment: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    compute = residual.compute_factors
    monkeypatch.setattr(residual, "compute_factors", lambda *a: calls.append(a) or compute(*a))
    exp = experiment_from_dict(tiny_experiment)
    base = base_fingerprint(exp.model)
    first = residual.prepare_residual(exp, "pissa", 0, base)
    factors = Path(first.ref["path"]) / residual.FACTORS
    stamp = (factors.stat().st_mtime_ns, first.ref["factors_sha256"])
    again = residual.prepare_residual(exp, "pissa", 1, base)  # plain PiSSA: the seed is not part of the key
    assert len(calls) == 1 and again.ref == first.ref
    assert (factors.stat().st_mtime_ns, sha256_file(factors)) == stamp
    assert all(torch.equal(first.factors[k], again.factors[k]) for k in first.factors) and len(first.factors) == 8
    assert first.ref["key"]["target_modules"] == ["q_proj", "v_proj"] and first.ref["key"]["seed"] is None

    def key_dir(lora_init: str, seed: int = 0, **lora) -> str:
        data = {**tiny_experiment, "lora": {**tiny_experiment["lora"], **lora}}
        other = experiment_from_dict(data)
        return Path(residual.prepare_residual(other, lora_init, seed, base).ref["path"]).name

    others = [key_dir("pissa", r=2), key_dir("pissa", target_modules=["q_proj"]), key_dir("olora"),
              key_dir("pissa", alpha=16), key_dir("pissa_niter_2", 0), key_dir("pissa_niter_2", 1)]
    assert key_dir("pissa_niter_2", 0) == others[4]  # seeded: the same seed reuses
    assert len({Path(first.ref["path"]).name, *others}) == 7 and len(calls) == 7
    stored = sorted(p.name for p in (exp.run_dir / "lora_inits").iterdir())
    assert len(stored) == 7 and not [n for n in stored if ".tmp-" in n]


def test_seeded_factors_follow_their_seed_and_leave_the_callers_rng(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    model_dir = Path(exp.model.name_or_path)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    runs = [residual.compute_factors(model_dir, "float32", exp.lora, "pissa_niter_2", s) for s in (0, 0, 1)]
    assert torch.equal(torch.random.get_rng_state(), state)
    key = next(iter(runs[0]))
    assert torch.equal(runs[0][key], runs[1][key]) and not torch.equal(runs[0][key], runs[2][key])


@pytest.mark.parametrize(("init", "dtype"), [("pissa", "float32"), ("olora", "float32"), ("pissa", "bfloat16")])
def test_residual_model_equals_peft_own_init_and_the_base_at_step_zero(
        tiny_experiment: dict, init: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same base weights (residual), same adapter, same logits as get_peft_model(init_lora_weights=init);
    the logits equal the base model's; with adapters disabled it is not the base any more."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from d2lora_dist import distributed

    monkeypatch.setattr(distributed, "device", lambda: torch.device("cpu"))  # PEFT's SVD below runs on the CPU
    tiny_experiment["model"]["dtype"] = dtype
    exp = experiment_from_dict(tiny_experiment)

    def base_model():  # load_base_model refuses bf16 on CPU; the dtype handling is what is tested here
        return AutoModelForCausalLM.from_pretrained(exp.model.name_or_path, dtype=getattr(torch, dtype)).eval()

    tokenizer = load_tokenizer(exp.model)
    plain = _logits(base_model(), tokenizer)
    ours = attach_lora(base_model(), exp.lora, None, init,
                       residual.prepare_residual(exp, init, 0, base_fingerprint(exp.model)))
    peft_own = get_peft_model(base_model(), peft_lora_config(exp.lora, init))
    theirs = dict(peft_own.named_parameters())
    compared = [n for n, _ in ours.named_parameters() if "lora_" in n or "base_layer" in n]
    assert len(compared) == 12  # 4 modules: residual weight, A, B
    # bit for bit on any CPU: the cached factors come from PEFT's own layer init (the same SVD of the same
    # weight) and apply_residual uses PEFT's expression, so both sides run the same operations on the same inputs
    for name, p in ours.named_parameters():
        assert p.dtype == theirs[name].dtype and torch.equal(p, theirs[name]), name
    torch.testing.assert_close(_logits(ours, tokenizer), _logits(peft_own, tokenizer), rtol=0, atol=0)
    # (W - sBA) + sBA vs W: rounded at the weights' precision, so the logits move by a fraction of their own
    # scale (|logit| up to ~15): compared norm-relative (tests/closeness.py), measured 3e-7 in float32 and
    # 6e-3 in bf16 (its eps 7.8e-3), on avx2 and ATEN_CPU_CAPABILITY=default alike; elementwise, an absolute
    # 1e-5 was within 2x of the 5e-6 measured
    tol = 1e-5 if dtype == "float32" else 5e-2
    assert relative_difference(_logits(ours, tokenizer).float(), plain.float()) < tol
    with ours.disable_adapter():  # measured 0.6 (pissa) and 0.74 (olora) of the base logits' norm
        assert relative_difference(_logits(ours, tokenizer).float(), plain.float()) > 0.2


@pytest.fixture(scope="module")
def pissa(tiny_model_dir: Path, tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A PiSSA SFT adapter trained 2 steps, with the trained model's logits."""
    exp = experiment_from_dict(tiny_experiment_dict(tiny_model_dir, tiny_data, tmp_path_factory.mktemp("pissa")))
    tokenizer = load_tokenizer(exp.model)
    capture = CaptureLogits(tokenizer)
    phase = _phase(exp, "sft-pissa", "sft", "pissa", callbacks=[capture])
    outcome = train_phase(exp, phase)
    return SimpleNamespace(exp=exp, adapter=phase.out_adapter, logits=capture.logits, outcome=outcome,
                           tokenizer=tokenizer)


def test_a_pissa_adapter_names_its_residual_and_reloads_to_the_trained_logits(pissa) -> None:
    manifest = adapters.verify_adapter(pissa.adapter)
    name, ref = adapters.lora_init_of(manifest)
    assert name == "pissa" and ref["key"]["lora_init"] == "pissa" and Path(ref["path"]).is_dir()
    assert ref["factors_sha256"] == sha256_file(Path(ref["path"]) / residual.FACTORS)
    assert manifest["reference"] is None and pissa.outcome.steps == 2
    with loaded_for_eval(pissa.exp, pissa.adapter) as (model, _):
        reloaded = _logits(model, pissa.tokenizer)
    # the same residual (the cached factors, PEFT's expression) and adapter, the same forward: measured 0 apart
    torch.testing.assert_close(reloaded, pissa.logits, rtol=0, atol=1e-6)
    state, _ = adapters.load_adapter_state(pissa.adapter)
    on_plain_base = attach_lora(load_base_model(pissa.exp.model, training=False), pissa.exp.lora, state)
    assert (_logits(on_plain_base, pissa.tokenizer) - pissa.logits).abs().max() > 1e-2  # the residual matters


def test_an_adapter_whose_residual_factors_are_missing_or_changed_is_refused(pissa, tmp_path: Path) -> None:
    import shutil

    ref = adapters.lora_init_of(adapters.read_manifest(pissa.adapter))[1]
    copied = tmp_path / "factors"
    shutil.copytree(ref["path"], copied)
    moved = {**ref, "path": str(copied)}
    residual.load_residual(moved, tmp_path)  # an intact copy loads
    data = bytearray((copied / residual.FACTORS).read_bytes())
    data[-1] ^= 1
    (copied / residual.FACTORS).write_bytes(bytes(data))
    with pytest.raises(residual.ResidualError, match=rf"{copied / residual.FACTORS}: checksum"):
        residual.load_residual(moved, tmp_path)
    (copied / residual.FACTORS).unlink()
    with pytest.raises(residual.ResidualError, match=rf"{copied / residual.FACTORS}: the residual factors are missing"):
        residual.load_residual(moved, tmp_path)
    gone = {**ref, "path": str(tmp_path / "elsewhere" / "pissa-r4-0")}
    with pytest.raises(residual.ResidualError, match=r"elsewhere/pissa-r4-0/factors.safetensors: the residual"):
        residual.load_residual(gone, tmp_path)
    assert adapters.lora_init_of({"adapter_sha256": "x"}) == ("default", None)  # written before the field


def test_a_warm_start_trains_on_its_parents_residual_and_init_is_the_reference(
        pissa, monkeypatch: pytest.MonkeyPatch) -> None:
    from d2lora_dist import train

    def own_factors(*args):
        raise AssertionError("a warm start must not prepare factors of its own key")

    monkeypatch.setattr(train, "prepare_residual", own_factors)
    exp = pissa.exp
    exp.methods["dpo"].reference = "init"
    phase = _phase(exp, "dpo-warm", "dpo", "pissa", init_adapter=pissa.adapter)
    first = next(h for h in train_phase(exp, phase).log_history if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # reference = starting adapter over the residual
    manifest, parent = adapters.verify_adapter(phase.out_adapter), adapters.read_manifest(pissa.adapter)
    assert manifest["lora_init"] == parent["lora_init"]
    assert manifest["reference"] == f"init (starting adapter over residual {Path(parent['lora_init']['residual']['path']).name})"
    mismatched = _phase(exp, "dpo-mismatch", "dpo", "default", init_adapter=pissa.adapter)
    with pytest.raises(ConfigError, match=r"lora_init 'default', but the starting adapter .* lora_init 'pissa'"):
        train_phase(exp, mismatched)


def test_dpo_reference_base_is_refused_with_a_residual_init(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    exp.methods["dpo"].reference = "base"
    with pytest.raises(ConfigError, match=r"methods\.dpo\.reference: 'base' with lora_init 'olora'.*residual"):
        train_phase(exp, _phase(exp, "dpo-base", "dpo", "olora"))
    assert not (exp.run_dir / "lora_inits").exists()  # refused before any factor or model


def test_a_residual_phase_gives_the_shared_base_back_bit_for_bit(tiny_experiment: dict) -> None:
    """PiSSA training and evaluation on a shared base, then a default phase there: the same adapter as
    the default phase alone (the worker's pristine check passed: no reload)."""
    exp = experiment_from_dict(tiny_experiment)
    shared = SharedBase()
    pissa = _phase(exp, "sft-pissa", "sft", "pissa", models=shared)
    train_phase(exp, pissa)
    with loaded_for_eval(exp, pissa.out_adapter, shared) as (model, _):
        assert any("lora_A" in n for n, _ in model.named_parameters())
    after = train_phase(exp, _phase(exp, "dpo-after", "dpo", "default", models=shared))
    alone = train_phase(exp, _phase(exp, "dpo-alone", "dpo", "default"))
    assert shared.loads == 1
    states = [adapters.load_adapter_state(exp.run_dir / n / "adapter")[0] for n in ("dpo-after", "dpo-alone")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]) and after.final_loss == alone.final_loss
