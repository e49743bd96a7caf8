"""The local executor: warm-up, every unfinished cell as its own launch, the report; reruns resume."""

from __future__ import annotations

import os
from pathlib import Path

from tests import disk_fixtures
from tests.conftest import write_experiment
from tests.test_cli import _cli


def test_sweep_run_executes_the_grid_and_reports(tiny_experiment: dict, tmp_path: Path) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 4]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    done = _cli("sweep", "run", "-c", str(path), "--slots", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (run_dir / "cells").iterdir()) == [
        "math-none-d2lora-n0-s0", "math-none-lora-n0-s0", "math-sft-d2lora-n4-s0", "math-sft-lora-n4-s0"]
    assert all((run_dir / "cells" / c / "result.json").is_file() for c in os.listdir(run_dir / "cells"))
    # one slot, one plain process per cell: all four share one worker, which loads the base once
    assert done.stdout.count("sweep worker") == 1 and "sweep cell" not in done.stdout
    assert "base model loaded 1 time(s) for 4 cell(s)" in done.stdout
    assert (run_dir / "report" / "results.md").is_file()
    again = _cli("sweep", "run", "-c", str(path))
    assert again.returncode == 0 and "4 of 4 cells done; running 0" in again.stdout
    # rerunning the same command with slots asked for, nothing left to run: said, the report rebuilt, exit 0
    for slots in ("2", "1"):
        (run_dir / "report" / "results.md").unlink()
        rerun = _cli("sweep", "run", "-c", str(path), "--slots", slots)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "running 0: nothing left to run" in rerun.stdout and (run_dir / "report" / "results.md").is_file()
    # the frozen experiment protects finished results from an edited config
    changed = _cli("sweep", "run", "-c", str(path), "--set", "methods.sft.learning_rate=0.5")
    assert changed.returncode == 2 and "was frozen with other settings" in changed.stderr


def test_axes_locally_a_failed_warmup_holds_back_its_cells_and_pissa_cells_keep_their_residual(
        tiny_experiment: dict, tmp_path: Path) -> None:
    """Two warm-ups x two LoRA inits on the tiny model: `bad` diverges (lr = inf), so its two warm-up runs
    fail and their cells are skipped; every other cell runs; a PiSSA D2LoRA cell trains on the residual
    its warm-up was trained on."""
    import json

    good = tiny_experiment.pop("warmup")
    tiny_experiment["warmups"] = {"good": good, "bad": {**good, "train": {**good["train"], "learning_rate": float("inf")}}}
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [4],
                                "lora_inits": ["default", "pissa"]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    done = _cli("sweep", "run", "-c", str(path))
    run_dir = tmp_path / "runs" / "tiny"
    assert done.returncode == 1  # some cells did not run
    assert "warm-up bad failed" in done.stdout and "held back by a failed warm-up" in done.stdout
    ran = sorted(p.name for p in (run_dir / "cells").iterdir())
    assert ran == ["math-sft-d2lora@good+pissa-n4-s0", "math-sft-d2lora@good-n4-s0", "math-sft-lora+pissa-n4-s0",
                   "math-sft-lora-n4-s0"]
    assert all((run_dir / "cells" / c / "result.json").is_file() for c in ran)
    assert "math-sft-d2lora@bad-n4-s0" in done.stderr  # named among the failed cells

    def manifest(adapter: Path) -> dict:
        return json.loads((adapter / "manifest.json").read_text())

    warm = manifest(run_dir / "warmups" / "good+pissa" / "adapter")
    cell = manifest(run_dir / "cells" / "math-sft-d2lora@good+pissa-n4-s0" / "adapter")
    assert warm["lora_init"]["name"] == cell["lora_init"]["name"] == "pissa"
    assert cell["lora_init"]["residual"] == warm["lora_init"]["residual"] is not None  # one residual base
    assert cell["parent"]["adapter_sha256"] == warm["adapter_sha256"]
    vanilla = manifest(run_dir / "cells" / "math-sft-lora+pissa-n4-s0" / "adapter")
    assert vanilla["lora_init"]["residual"]["key"]["lora_init"] == "pissa"
    assert manifest(run_dir / "cells" / "math-sft-lora-n4-s0" / "adapter")["lora_init"] == {"name": "default",
                                                                                             "residual": None}


small_disk = disk_fixtures.small_disk


def test_a_full_disk_fails_the_cells_cleanly_keeps_what_is_done_and_a_rerun_completes(
        tiny_experiment: dict, small_disk: Path, tmp_path: Path) -> None:
    """A real 2 MiB tmpfs holds the run directory: with one cell done, the disk is filled; `sweep run --slots 2`
    fails the two cells it starts with one line naming what each was writing, stops without a traceback and
    exits 2; the done cell is untouched and no temporary file is left; freed, the same command completes."""
    import hashlib
    import re

    tiny_experiment["output_dir"] = str(small_disk / "runs")
    tiny_experiment["grid"] = [{"task": "titles", "methods": ["sft"], "inits": ["lora"], "n": [4],
                                "seeds": [0, 1, 2]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    first = _cli("sweep", "cell", "-c", str(path), "--cell", "titles-sft-lora-n4-s0")
    assert first.returncode == 0, first.stderr[-3000:]
    run = small_disk / "runs" / "tiny"
    done = run / "cells" / "titles-sft-lora-n4-s0" / "result.json"
    before = hashlib.sha256(done.read_bytes()).hexdigest()
    filler = disk_fixtures.fill(small_disk, leave=24 << 10)  # room for the frozen plan, not for a cell

    full = _cli("sweep", "run", "-c", str(path), "--slots", "2")
    assert full.returncode == 2, full.stdout[-3000:] + full.stderr[-3000:]
    assert "Traceback" not in full.stdout + full.stderr
    for seed in (1, 2):
        cell = f"titles-sft-lora-n4-s{seed}"
        line = next(x for x in full.stdout.splitlines() if f"] {cell} FAILED" in x)
        assert re.search(rf"ended: no space left on device writing {run}/cells/{cell}/\S* \(.*free on {small_disk} "
                         r"\(tmpfs\)\)", line), line
    assert full.stderr.strip().startswith("d2lora: error: the sweep stopped, 2 cell(s) failed")
    assert len(full.stderr.strip().splitlines()) == 1
    assert hashlib.sha256(done.read_bytes()).hexdigest() == before
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]

    filler.unlink()
    again = _cli("sweep", "run", "-c", str(path), "--slots", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert all((run / "cells" / f"titles-sft-lora-n4-s{s}" / "result.json").is_file() for s in (0, 1, 2))
    assert hashlib.sha256(done.read_bytes()).hexdigest() == before


def test_a_moved_run_directory_continues_in_its_new_place_without_retraining(tiny_experiment: dict,
                                                                             tmp_path: Path) -> None:
    import shutil

    from d2lora_dist.config import load_experiment

    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora"], "n": [0, 4]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    first = _cli("sweep", "run", "-c", str(path), "--slots", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    old, new = tmp_path / "runs" / "tiny", tmp_path / "elsewhere" / "tiny"
    shutil.rmtree(old / "cells" / "math-none-lora-n0-s0")  # one cell left to do
    trained = (old / "cells" / "math-sft-lora-n4-s0" / "result.json").read_bytes()
    new.parent.mkdir()
    shutil.move(old, new)
    moved = _cli("sweep", "run", "-c", str(path), "--set", f"output_dir={new.parent}", "--slots", "1")
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "1 of 2 cells done; running 1" in moved.stdout and "[math-sft-lora-n4-s0] launch" not in moved.stdout
    assert (new / "cells" / "math-sft-lora-n4-s0" / "result.json").read_bytes() == trained  # not retrained
    assert (new / "cells" / "math-none-lora-n0-s0" / "result.json").is_file()
    assert not old.exists()  # nothing written where it came from
    # its frozen file reads as where it is now; every other setting is still compared
    assert load_experiment(new / "experiment.yaml").run_dir == new
    changed = _cli("sweep", "run", "-c", str(path), "--set", f"output_dir={new.parent}",
                   "--set", "methods.sft.learning_rate=0.5")
    assert changed.returncode == 2 and "methods.sft.learning_rate" in changed.stderr
    assert "output_dir" not in changed.stderr
