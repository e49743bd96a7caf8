"""The report's tuned-settings section: validation score per setting and arm, the chosen one marked, a plot."""

from __future__ import annotations

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.report.collect import collect
from d2lora_dist.report.tuning import tuning_section
from d2lora_dist.sweep.grid import plan_cells
from tests.test_sweep_tuning import _fake_selection, tuned_dict


def test_each_arm_shows_its_validation_scores_and_chosen_setting_and_selection_cells_stay_out_of_the_tables(
        tiny_experiment, tmp_path):
    data = tuned_dict(tiny_experiment, tmp_path)
    data["grid"][0]["inits"] = ["lora", "d2lora"]
    exp = experiment_from_dict(data)
    layout = RunLayout(exp.run_dir)
    cells = plan_cells(exp)
    lines, plots = tuning_section(exp, layout, cells, tmp_path / "plots")
    text = "\n".join(lines)
    assert "| lr1e-2 | — | — |" in text and "| **chosen** | pending | pending |" in text
    assert plots == []  # nothing scored yet: no empty figure
    _fake_selection(layout, exp, {"lr1e-2": [0.5, 0.1], "lr1e-4": [0.2, 0.2], "lr1e-3": [0.1, 0.1]},
                    {"lr1e-2": 0.0, "lr1e-4": 0.0, "lr1e-3": 0.0})
    lines, plots = tuning_section(exp, layout, cells, tmp_path / "plots")
    table = "\n".join(lines)
    assert "| setting | LoRA | D2LoRA |" in table
    assert "| lr1e-2 | 30.00 ± 28.28 ✓ | 30.00 ± 28.28 ✓ |" in table  # both arms read their own cells
    assert "| lr1e-4 | 20.00 ± 0.00 | 20.00 ± 0.00 |" in table and "| **chosen** | lr1e-2 | lr1e-2 |" in table
    assert [p.name for p in plots] == ["titles_sft_n2_tuning.png"] and plots[0].stat().st_size > 0
    coll = collect(exp, layout)
    assert not any("-tune-" in c.id for c in coll.planned) and coll.finished == {} and coll.rows == []
