"""Mistakes a new user makes, each refused before work starts: one error naming the key, the file and
the YAML line (or the `--set` argument), exit 2, no model loaded, nothing in the run directory touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2lora_dist import adapters
from d2lora_dist.cli import main
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.modeling import attach_lora, base_fingerprint, load_base_model
from d2lora_dist.train import lora_summary
from tests.conftest import write_experiment


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_model_loads(monkeypatch)


def _refuse_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any base model built in this process from now on fails the test: the refusal must come first."""
    import transformers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the preflight refused the input")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def _line(path: Path, text: str, after: str | None = None) -> int:
    """1-based line of the first line equal to `text` (stripped), below the line `after` when given."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    start = lines.index(after) if after else 0
    return lines.index(text, start) + 1


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.usefixtures("no_model_loads")
def test_a_negative_warmup_n_is_refused_with_its_line(tiny_experiment: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["warmup"]["n"] = -8  # once a negative slice: 16 of the 24 rows
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    err = _refused(["sweep", "run", "-c", str(path)], capsys)
    assert f"d2lora: error: {path}: 1 problem(s)" in err
    assert f"line {_line(path, 'n: -8')}: warmup.n: must be >= 1 or null (all rows), got -8" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("no_model_loads")
def test_a_zero_warmup_n_is_refused_as_itself_not_as_long_prompts(tiny_experiment: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["warmup"]["n"] = 0
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    err = _refused(["warmup", "-c", str(path)], capsys)
    assert f"line {_line(path, 'n: 0')}: warmup.n: must be >= 1 or null (all rows), got 0" in err
    assert "max_length" not in err and str(path) in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("no_model_loads")
def test_a_zero_rank_and_alpha_are_refused(tiny_experiment: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["lora"].update(r=0, alpha=0)
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    err = _refused(["adapt", "-c", str(path), "--task", "math", "--method", "sft", "--init", "lora", "--n", "4"],
                   capsys)
    assert f"line {_line(path, 'r: 0')}: lora.r: must be >= 1 (the adapter's rank), got 0" in err
    assert f"line {_line(path, 'alpha: 0')}: lora.alpha: must be > 0 (the scale is alpha / r), got 0" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("no_model_loads")
def test_a_model_that_is_not_on_this_machine_is_refused_in_the_preflight(
        tiny_experiment: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "models" / "tiny-llama"
    tiny_experiment["model"]["name_or_path"] = str(missing)
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    line = _line(path, f"name_or_path: {missing}")
    err = _refused(["eval", "-c", str(path), "--task", "math"], capsys)
    assert f"line {line}: model.name_or_path: '{missing}' is a local path that does not exist" in err
    assert "Repo id must be" not in err
    monkeypatch.chdir(tmp_path)  # relative paths are local too, not hub ids
    err = _refused(["sweep", "plan", "-c", str(path), "--set", "model.name_or_path=./models/tiny-llama"], capsys)
    assert ("--set model.name_or_path=./models/tiny-llama: model.name_or_path: './models/tiny-llama' is a local path "
            "that does not exist") in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(["sweep", "run", "-c", str(path), "--set", "model.name_or_path=nobody/no-such-model"], capsys)
    assert "model.name_or_path: hub id 'nobody/no-such-model' is not in the Hugging Face cache (" in err
    assert "and downloads are off (HF_HUB_OFFLINE); download it where the hub is reachable" in err
    err = _refused(["warmup", "-c", str(path), "--set", "model.name_or_path=asset:no_such_asset"], capsys)
    assert "model.name_or_path: unknown asset 'no_such_asset'" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("no_model_loads")
def test_a_target_module_the_model_lacks_is_refused_listing_those_it_has(tiny_experiment: dict, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["lora"]["target_modules"] = ["q_proj", "qkv_proj", "self_attn.v_proj"]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    err = _refused(["sweep", "run", "-c", str(path)], capsys)
    assert (f"{path}: 1 problem(s)" in err and f"line {_line(path, '- qkv_proj')}: lora.target_modules[1]: 'qkv_proj' "
            f"is not a module of {tiny_experiment['model']['name_or_path']} (its modules with weight matrices: "
            "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)") in err
    assert not (tmp_path / "runs").exists()


def test_set_values_that_are_not_yaml_name_the_argument_and_grid_entries_can_be_set(
        tiny_experiment: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    err = _refused(["sweep", "plan", "-c", str(path), "--set", "lora.target_modules=[q_proj, v_proj"], capsys)
    assert ("--set lora.target_modules=[q_proj, v_proj: the value is not valid YAML (expected ',' or ']', but got "
            "'<stream end>' at column 16)") in err
    assert "Traceback" not in err
    assert main(["sweep", "plan", "-c", str(path), "--json", "--set", "grid[0].n=[4]"]) == 0
    out = capsys.readouterr().out
    assert "-n4-" in out and "-n0-" not in out
    err = _refused(["sweep", "plan", "-c", str(path), "--set", "grid[1].n=[4]"], capsys)
    assert "--set grid[1].n=[4]: grid has 1 entries, no [1]" in err
    err = _refused(["sweep", "plan", "-c", str(path), "--set", "grid.n=[4]"], capsys)
    assert "--set grid.n=[4]: grid is a list: name an entry, e.g. grid[0].n" in err
    err = _refused(["sweep", "plan", "-c", str(path), "--set", "grid[0].n=[-4]"], capsys)
    assert "--set grid[0].n=[-4]: grid[0].n: -4 must be >= 0" in err
    assert not (tmp_path / "runs").exists()


def _warmup_adapter(exp_dict: dict, rank: int) -> RunLayout:
    """A finished warm-up in the run directory, as a run before this one left it (rank `rank`)."""
    exp = experiment_from_dict(exp_dict)
    exp.lora.r = rank
    layout = RunLayout(exp.run_dir)
    model = attach_lora(load_base_model(exp.model, training=True), exp.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    adapters.save_adapter(model, layout.warmup_adapter, {"phase": "warmup", "base_model": base_fingerprint(exp.model),
                                                         "lora": lora_summary(exp)})
    layout.warmup_result.write_text("{}")
    return layout


def test_a_damaged_wrong_rank_or_other_base_warmup_adapter_stops_sweep_run_in_one_line(
        tiny_experiment: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _warmup_adapter(tiny_experiment, rank=8)  # the experiment says r: 4
    _refuse_model_loads(monkeypatch)
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    before = _tree(layout.root)
    err = _refused(["sweep", "run", "-c", str(path)], capsys)
    assert (f"warm-up warmup: {layout.warmup_adapter}: adapter was made for a different LoRA config; "
            "r: adapter has 8, this run has 4") in err
    assert f"move {layout.warmup_dir} away" in err and "rerun" not in err and "Traceback" not in err
    assert _tree(layout.root) == before
    manifest = layout.warmup_adapter / adapters.MANIFEST  # an adapter of another base model
    manifest.write_text(manifest.read_text().replace(base_fingerprint(experiment_from_dict(tiny_experiment).model)
                                                     ["config_sha256"], "0" * 64))
    before = _tree(layout.root)
    err = _refused(["sweep", "run", "-c", str(path), "--set", "lora.r=8"], capsys)
    assert (f"warm-up warmup: {layout.warmup_adapter}: adapter was made for a different base model; "
            f"config_sha256: adapter has '{'0' * 64}'") in err
    assert _tree(layout.root) == before
    weights = layout.warmup_adapter / adapters.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = _tree(layout.root)
    err = _refused(["sweep", "run", "-c", str(path), "--set", "lora.r=8"], capsys)
    assert f"warm-up warmup: {weights}: checksum mismatch" in err and "rerun" not in err
    assert _tree(layout.root) == before  # nothing written, nothing replaced
    assert not layout.cells_dir.exists() and not layout.experiment_file.exists()


@pytest.mark.usefixtures("no_model_loads")
def test_every_problem_of_a_file_comes_in_one_round(tiny_experiment: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["lora"]["rank"] = 8
    tiny_experiment["methods"]["sft"]["learning_rate"] = -1e-3
    tiny_experiment["suites"]["titles"]["limit"] = 0
    tiny_experiment["grid"][0]["n"] = [4, 41]  # 40 math rows
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    for entry in (["sweep", "run"], ["sweep", "submit", "--dry-run"]):
        err = _refused([*entry, "-c", str(path)], capsys)
        assert err.count("d2lora: error:") == 1 and f"{path}: 7 problem(s)" in err
        assert f"line {_line(path, 'rank: 8')}: lora.rank: unknown key" in err
        assert f"line {_line(path, 'learning_rate: -0.001')}: methods.sft.learning_rate: must be > 0, got -0.001" in err
        assert f"line {_line(path, 'limit: 0')}: suites.titles.limit: must be >= 1 or null (all items), got 0" in err
        assert "math-dpo-lora-n41-s0: n=41 but task 'math' has only 40 usable preference rows" in err
    assert not (tmp_path / "runs").exists()
