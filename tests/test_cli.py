"""The `d2lora` command: help everywhere, clear errors (exit 2), and real runs on the tiny model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from d2lora_dist.cli import build_parser, main
from tests.conftest import REPO, write_experiment


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every leaf command of the parser (`sweep run`, `data check`, ...), read from its subparsers."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [list(prefix)]
    return [c for name, sub in groups[0].choices.items() for c in _commands(sub, (*prefix, name))]


COMMANDS = _commands(build_parser())


def test_the_commands_are_read_from_the_parser() -> None:
    assert {" ".join(c) for c in COMMANDS} >= {"warmup", "adapt", "report", "data check", "sweep run", "sweep submit"}
    assert all(c and c[0] not in ("data", "sweep") or len(c) == 2 for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: d2lora" in capsys.readouterr().out


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2lora_dist.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_bad_config_exits_2_naming_the_key(tiny_experiment: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["warmup"]["train"]["lr"] = 0.1
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main(["warmup", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "d2lora: error:" in err and "warmup.train.lr: unknown key" in err and str(path) in err
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written


def test_score_reads_predictions_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"completion": "so she has 18 eggs. The answer is 18.", "reference": "16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18"},
            {"completion": "The answer is $1,250.", "reference": "1250"},
            {"completion": "I think 7", "reference": "#### 8"}]
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "gsm8k", str(path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["items"] == 3
    # lm-eval's own filters beside ours: no "#### " for strict-match; flexible-extract reads "18." and "$1,250."
    assert metrics["strict_match"] == 0.0 and metrics["flexible_extract"] == pytest.approx(2 / 3)
    titles = tmp_path / "titles.jsonl"
    titles.write_text(json.dumps({"completion": "Low rank adapters", "reference": "Low rank adapters"}) + "\n")
    assert main(["score", "titles", str(titles)]) == 0
    assert "rougeL: 1.0000" in capsys.readouterr().out
    titles.write_text("".join(json.dumps({"completion": c, "reference": "Low rank adapters"}) + "\n" for c in
                              ["Here is a title for the paper:\n\nLow rank adapters", "Low rank adapters"]))
    assert main(["score", "titles", str(titles), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["rougeL"] == 1.0 and scored["bare_title"] == 0.5  # the preamble is not scored, and is counted
    (tmp_path / "bad.jsonl").write_text(json.dumps({"completion": "x"}) + "\n")
    assert main(["score", "gsm8k", str(tmp_path / "bad.jsonl")]) == 2
    assert "reference" in capsys.readouterr().err


def test_score_rescores_every_suite_kind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a multiple-choice predictions file is rescored from its stored log-likelihoods
    arc = tmp_path / "arc_challenge.jsonl"
    arc.write_text("".join(json.dumps({"id": i, "choices": ["ab", "abcdefghijkl"], "logliks": [-3.0, -6.0],
                                       "gold": gold}) + "\n" for i, gold in enumerate([0, 1])))
    assert main(["score", "arc", str(arc), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.5, "accuracy_norm": 0.5, "items": 2}
    arc.write_text(json.dumps({"id": 0, "choices": ["a"], "logliks": [-1.0]}) + "\n")
    assert main(["score", "arc", str(arc)]) == 2
    assert f"{arc}:1: missing key 'gold'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "arc_challenge", str(arc)])  # a suite's name is not its kind
    assert exit_info.value.code == 2
    assert "invalid choice: 'arc_challenge' (choose from" in capsys.readouterr().err


def test_data_check_reports_counts_reasons_and_an_example(tiny_data: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", "math_step_dpo", "--data-files", tiny_data["math"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 40 and report["forms"]["preference"]["valid_rows"] == 40
    assert report["forms"]["sft"]["example"]["prompt"][0]["role"] == "user"
    assert main(["data", "check", "econ_abstracts", "--data-files", tiny_data["math"]]) == 2
    assert "missing column(s) ['abstract', 'title']" in capsys.readouterr().err


def test_warmup_then_adapt_through_the_real_command(tiny_experiment: dict, tmp_path: Path) -> None:
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    warm = _cli("warmup", "-c", str(path))
    assert warm.returncode == 0, warm.stderr[-3000:]
    adapt = _cli("adapt", "-c", str(path), "--task", "math", "--method", "dpo", "--init", "d2lora", "--n", "4",
                 "--set", "methods.dpo.beta=0.2")
    assert adapt.returncode == 0, adapt.stderr[-3000:]
    result = json.loads((tmp_path / "runs/tiny/cells/math-dpo-d2lora-n4-s0/result.json").read_text())
    manifest = json.loads((tmp_path / "runs/tiny/cells/math-dpo-d2lora-n4-s0/adapter/manifest.json").read_text())
    assert manifest["hyperparameters"]["beta"] == 0.2
    assert result["train"]["first_loss"] == pytest.approx(0.693147, abs=1e-4)


def test_sweep_plan_lists_cells_and_work(tiny_experiment: dict, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main(["sweep", "plan", "-c", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["math-none-d2lora-n0-s0", "math-none-lora-n0-s0", "math-dpo-d2lora-n4-s0",
                                       "math-dpo-lora-n4-s0", "math-sft-d2lora-n4-s0", "math-sft-lora-n4-s0"]
    assert all(r["eval_items"] == 8 and not r["done"] for r in rows)
    assert rows[0]["train_tokens"] == 0 and rows[-1]["train_tokens"] > 0


def test_sweep_refuses_cells_larger_than_the_data_before_loading_a_model(tiny_experiment: dict, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["grid"][0]["n"] = [4, 41, 500]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main(["sweep", "run", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "math-dpo-lora-n41-s0: n=41 but task 'math' has only 40 usable preference rows" in err
    assert "math-sft-d2lora-n500-s0" in err and "-n4-" not in err
    assert not (tmp_path / "runs").exists()


def test_a_bug_keeps_its_traceback_while_bad_input_exits_2(tiny_experiment: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from d2lora_dist import entries

    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")

    def buggy(*args, **kwargs):
        return {}["a key the code forgot"]  # a KeyError from code, not from the user

    monkeypatch.setattr(entries, "preflight", buggy)
    with pytest.raises(KeyError, match="a key the code forgot"):
        main(["sweep", "plan", "-c", str(path)])
    assert main(["score", "gsm8k", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such predictions file" in capsys.readouterr().err
