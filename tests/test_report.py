"""Report: tables, paired statistics, plots and the W&B report plan, on hand-written cells.

Each fixture cell gets a result.json and predictions/<suite>.jsonl whose per-item scores average
to its result.json metrics. The intervals are held against cases worked out by hand (or by an
exact binomial computation), never against a copy of the bootstrap.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.report import report
from d2lora_dist.report.collect import collect
from d2lora_dist.report.paired import DELTAS_CSV_COLUMNS, Deltas, load_item_scores
from d2lora_dist.report.plots import INTERVAL, TREND, UNRESOLVED, delta_panel, joined_runs
from d2lora_dist.report.stats import excludes_zero, mean_std
from d2lora_dist.report.tables import table_specs
from d2lora_dist.report.verdicts import primary_keys
from d2lora_dist.report.wandb_report import build, plan_report

FIXTURE = Path(__file__).parent / "fixtures" / "report" / "experiment.yaml"
PLANNED = 42  # cells in the fixture's plan
M = 100  # items per suite in the fixture cells
KINDS = {"gsm8k": "gsm8k", "arc_easy": "arc", "titles": "titles"}  # as in the fixture experiment

# (cell id) -> (gsm8k accuracy, arc_easy accuracy); fractions, as the cells write them.
MATH = {
    "math-none-lora-n0-s0": (0.20, 0.60),
    "math-none-d2lora-n0-s0": (0.22, 0.61),
    "math-sft-lora-n100-s0": (0.21, 0.58),
    "math-sft-lora-n100-s1": (0.23, 0.60),
    "math-sft-d2lora-n100-s0": (0.24, 0.61),
    "math-sft-d2lora-n100-s1": (0.28, 0.59),
    "math-sft-lora-n1000-s0": (0.24, 0.57),
    "math-sft-lora-n1000-s1": (0.26, 0.59),
    "math-sft-d2lora-n1000-s0": (0.27, 0.60),
    "math-dpo-lora-n1000-s0": (0.30, 0.62),
}
# (cell id) -> (rouge1, rouge2, rougeL, arc_easy accuracy)
TITLES = {
    "titles-none-lora-n0-s0": (0.30, 0.12, 0.28, 0.60),
    "titles-none-d2lora-n0-s0": (0.33, 0.14, 0.31, 0.61),
    "titles-sft-lora-n1000-s0": (0.41, 0.20, 0.37, 0.58),
}
DELTA_RE = re.compile(r"^(\*\*)?(?P<delta>[+-]\d+\.\d\d)(\*\*)? \[(?P<lo>[+-]\d+\.\d\d), (?P<hi>[+-]\d+\.\d\d)\] "
                      r"· (?P<seeds>\d) seeds? × (?P<items>\d+) items(?P<rest>.*)$")


# ---- fixture writer --------------------------------------------------------------------------

def load_experiment(tmp_path: Path):
    data = yaml.safe_load(FIXTURE.read_text())
    data["output_dir"] = str(tmp_path / "runs")
    return experiment_from_dict(data, str(FIXTURE))


def cell_dict(cell_id: str) -> dict:
    task, method, init, n, seed = cell_id.split("-")
    return {"id": cell_id, "task": task, "method": method, "init": init, "n": int(n[1:]), "seed": int(seed[1:])}


def offset(cell_id: str) -> int:
    """Where a cell's run of correct items starts: arms and seeds get different items right."""
    cell = cell_dict(cell_id)
    return 7 * cell["seed"] + 3 * (cell["init"] == "d2lora")


def hits(value: float, start: int = 0, m: int = M) -> list[float]:
    """round(value * m) correct items, a run starting at item `start` (wrapping), the rest wrong."""
    k = round(value * m)
    return [1.0 if (i - start) % m < k else 0.0 for i in range(m)]


def rouge(value: float, m: int = M) -> list[float]:
    """Per-item F1 alternating value ± 0.05: mean `value`."""
    return [value + (0.05 if i % 2 else -0.05) for i in range(m)]


def prediction_rows(kind: str, scores: dict[str, list[float]]) -> list[dict]:
    """Rows as the evaluator writes them (the keys evaluate.scoring.item_scores reads)."""
    rows = []
    for i in range(len(next(iter(scores.values())))):
        row: dict = {"id": f"{kind}-{i}", "prompt": f"question {i}"}
        if kind == "gsm8k":
            ok = bool(scores["accuracy"][i])
            row |= {"completion": f"#### {7 if ok else 8}", "reference": "#### 7", "extracted": "7" if ok else "8",
                    "correct": ok, "correct_strict": ok, "correct_flexible": ok}
        elif kind == "arc":
            ok, ok_norm = bool(scores["accuracy"][i]), bool(scores["accuracy_norm"][i])
            row |= {"choices": ["a", "b"], "logliks": [-1.0, -2.0] if ok else [-2.0, -1.0], "gold": 0,
                    "pred": 0 if ok else 1, "pred_norm": 0 if ok_norm else 1, "correct": ok, "correct_norm": ok_norm}
        else:
            row |= {"completion": "a title", "reference": "a title", "extracted": "a title",
                    "score": {name: scores[name][i] for name in ("rouge1", "rouge2", "rougeL")}}
        rows.append(row)
    return rows


def write_cell(layout: RunLayout, cell_id: str, items: dict[str, dict[str, list[float]]],
               extra: dict[str, dict[str, float]] | None = None, reverse: bool | None = None) -> None:
    """result.json with the means of `items` (suite -> metric -> per-item scores) plus `extra`
    metrics, and the predictions files (D2LoRA rows in reverse order: pairing is by id)."""
    cell = cell_dict(cell_id)
    reverse = cell["init"] == "d2lora" if reverse is None else reverse
    metrics = {}
    for suite, scores in items.items():
        metrics[suite] = {m: sum(v) / len(v) for m, v in scores.items()} | {"items": len(next(iter(scores.values())))}
        metrics[suite] |= (extra or {}).get(suite, {})
        rows = prediction_rows(KINDS[suite], scores)
        path = layout.cell_predictions(cell_id, suite)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in (rows[::-1] if reverse else rows)))
    trains = cell["n"] > 0
    result = {"cell": cell, "experiment": "report_fixture", "metrics": metrics,
              "suites": {s: ("task" if s != "arc_easy" else "forgetting") for s in items},
              "train": {"steps": 12, "first_loss": 0.69, "final_loss": 0.61, "runtime_s": 30.2} if trains else None,
              "adapter": {"sha256": "a" * 64, "parent_sha256": None} if trains else None,
              "finished_at": "2026-11-22T05:00:00Z"}
    layout.cell_result(cell_id).write_text(json.dumps(result))


def math_items(cell_id: str, gsm: float, arc: float) -> dict[str, dict[str, list[float]]]:
    start = offset(cell_id)
    return {"gsm8k": {"accuracy": hits(gsm, start)},
            "arc_easy": {"accuracy": hits(arc, start), "accuracy_norm": hits(arc + 0.01, start)}}


def write_result(layout: RunLayout, cell_id: str, metrics: dict, suites: dict) -> None:
    """A bare result.json without predictions (a cell from before per-item scores)."""
    path = layout.cell_result(cell_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cell": cell_dict(cell_id), "metrics": metrics, "suites": suites}))


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path)


def write_run(tmp_path: Path):
    """The fixture experiment with the MATH and TITLES cells finished (and one still running)."""
    exp = load_experiment(tmp_path)
    layout = RunLayout(exp.run_dir)
    for cell_id, (gsm, arc) in MATH.items():
        write_cell(layout, cell_id, math_items(cell_id, gsm, arc))
    for cell_id, (r1, r2, rl, arc) in TITLES.items():
        write_cell(layout, cell_id, {"titles": {"rouge1": rouge(r1), "rouge2": rouge(r2), "rougeL": rouge(rl)},
                                     "arc_easy": {"accuracy": hits(arc), "accuracy_norm": hits(arc)}})
    # A cell still running: its directory exists but result.json does not.
    layout.cell_subset("math-sft-d2lora-n1000-s1").parent.mkdir(parents=True)
    layout.cell_subset("math-sft-d2lora-n1000-s1").write_text("[]")
    return exp, layout


@pytest.fixture
def no_plots(monkeypatch):
    """Tests of the numbers skip drawing (matplotlib is most of a report's time)."""
    monkeypatch.setattr("d2lora_dist.report.write_plots", lambda *args, **kwargs: [])


@pytest.fixture
def empty_run(tmp_path):
    exp = load_experiment(tmp_path)
    return exp, RunLayout(exp.run_dir)


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the markdown table under `### heading...`: label -> cells (the n header under 'n')."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"### {heading}"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def deltas_csv(layout: RunLayout) -> list[dict[str, str]]:
    with layout.report_dir.joinpath("deltas.csv").open() as f:
        return list(csv.DictReader(f))


def delta_row(rows: list[dict[str, str]], task: str, method: str, n: int, suite: str, metric: str) -> dict:
    match = [r for r in rows if (r["task"], r["method"], r["n"], r["suite"], r["metric"])
             == (task, method, str(n), suite, metric)]
    assert len(match) == 1, (task, method, n, suite, metric)
    return match[0]


def parse_delta(text: str) -> dict:
    m = DELTA_RE.match(text)
    assert m, text
    return {"delta": float(m["delta"]), "lo": float(m["lo"]), "hi": float(m["hi"]), "seeds": int(m["seeds"]),
            "items": int(m["items"]), "rest": m["rest"], "bold": text.startswith("**")}


def sft_cells(layout: RunLayout, n: int, seeds: list[tuple[list[float], list[float]]], suite: str = "gsm8k") -> None:
    """LoRA/D2LoRA math SFT cells at n with these (LoRA, D2LoRA) gsm8k item scores per seed."""
    for seed, (lora, d2lora) in enumerate(seeds):
        for init, scores in (("lora", lora), ("d2lora", d2lora)):
            method = "none" if n == 0 else "sft"
            write_cell(layout, f"math-{method}-{init}-n{n}-s{seed}", {suite: {"accuracy": scores}})


def symmetric_difference(a: list[float], b: list[float]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


# ---- the tables ---------------------------------------------------------------------------------

def test_tables_show_mean_std_paired_delta_and_missing(run, capsys):
    exp, layout = run
    result = report(exp, layout)
    md = layout.report_dir.joinpath("results.md").read_text()
    assert md == result.markdown
    assert f"**13 of {PLANNED} planned cells done** (29 missing)" in md
    assert result.planned == PLANNED and result.done == 13 and len(result.missing) == 29
    assert "math-sft-d2lora-n1000-s1" in result.missing  # running, no result.json yet

    sft = table(md, "math · SFT · gsm8k (task suite)")
    assert sft["n"] == ["0", "100", "1000", "2000"]
    assert sft["LoRA"] == ["20.00", "22.00 ± 1.41", "25.00 ± 1.41", "—"]
    assert sft["D2LoRA"] == ["22.00", "26.00 ± 2.83", "27.00", "—"]
    delta = sft["Δ (D2LoRA − LoRA)"]
    n0, n100, n1000 = (parse_delta(d) for d in delta[:3])
    assert (n0["delta"], n0["seeds"], n0["items"]) == (2.0, 1, 100)
    assert " · 1 seed: test-set noise only · " in n0["rest"]
    assert (n100["delta"], n100["seeds"], n100["items"]) == (4.0, 2, 100)
    assert "test-set noise only" not in n100["rest"]
    # n = 1000: LoRA seeds 0 and 1, D2LoRA seed 0 only -> one paired seed (27 vs 24), not 27 vs 25.
    assert (n1000["delta"], n1000["seeds"]) == (3.0, 1)
    for d in (n0, n100, n1000):
        assert d["lo"] <= d["delta"] <= d["hi"]
        assert re.search(r" · MDE \d+\.\d\d · ", d["rest"])
    # The fixture's report.primary is math SFT n = 100 accuracy; min_seeds is 2.
    assert n100["rest"].endswith("(primary)") and n100["bold"] == n100["rest"].endswith("· resolved (primary)")
    assert n1000["rest"].endswith(" · too few seeds to resolve (1 of 2)") and not n1000["bold"]
    assert re.search(r"· (un)?resolved \(exploratory, Holm-adjusted p \d\.\d{3} over \d+ Δ\)$", n0["rest"])
    assert delta[3] == "—"
    assert sft["seeds done (LoRA · D2LoRA)"] == ["1/1 · 1/1", "2/2 · 2/2", "2/2 · 1/2", "0/2 · 0/2"]

    forgetting = table(md, "math · SFT · arc_easy (forgetting suite)")
    assert forgetting["LoRA"] == ["60.00", "59.00 ± 1.41", "58.00 ± 1.41", "—"]
    # n = 0 cells (method none) are in every method's table; ORPO has nothing else yet.
    orpo = table(md, "math · ORPO · gsm8k (task suite)")
    assert orpo["LoRA"] == ["20.00", "—", "—", "—"]
    assert orpo["Δ (D2LoRA − LoRA)"][0] == delta[0] and orpo["Δ (D2LoRA − LoRA)"][1:] == ["—", "—", "—"]
    dpo = table(md, "math · DPO · gsm8k (task suite)")
    assert dpo["LoRA"][2] == "30.00" and dpo["D2LoRA"][2] == "—"
    assert dpo["Δ (D2LoRA − LoRA)"][2] == "— (no seed finished for both inits)"

    titles = table(md, "titles · SFT · titles (task suite)")
    assert titles["n"] == ["0", "1000"]
    assert titles["ROUGE-L LoRA"] == ["28.00", "37.00"]
    assert titles["ROUGE-1 LoRA"] == ["30.00", "41.00"]
    assert titles["ROUGE-2 D2LoRA"] == ["14.00", "—"]
    # Every title item differs by exactly +3 points: the interval is [3, 3], resolved.
    # n = 0 is judged on the test items alone; Holm runs over its three ROUGE metrics.
    assert titles["ROUGE-L Δ (D2LoRA − LoRA)"] == [
        "**+3.00** [+3.00, +3.00] · 1 seed × 100 items · MDE 0.00 · 1 seed: test-set noise only · "
        "resolved (exploratory, Holm-adjusted p 0.000 over 3 Δ)",
        "— (no seed finished for both inits)"]
    # Paper order: per task, methods sft/dpo/orpo, task suite before forgetting suite.
    headings = [line for line in md.splitlines() if line.startswith("### math")]
    assert [h.split(":")[0] for h in headings[:2]] == ["### math · SFT · gsm8k (task suite)",
                                                      "### math · SFT · arc_easy (forgetting suite)"]
    assert "0.00" not in " ".join(dpo["D2LoRA"])  # missing is never shown as 0
    power = md.split("## Power", 1)[1].split("\n## ", 1)[0]
    assert "| math SFT n=100 accuracy (D2LoRA − LoRA) | primary | 2 × 100 | " in power  # target: 1 accuracy point
    assert re.search(r"\| math SFT n=100 accuracy \(D2LoRA − LoRA\) \| primary \| 2 × 100 \| [\d. ·]+ \| \d+\.\d\d \| 1 \| \d+ \|",
                     power)
    assert "| math SFT n=1000 accuracy (D2LoRA − LoRA) | exploratory | 1 × 100 | — |" in power
    assert "— (one seed: its variance is unknown) |" in power
    assert "95% t interval from the crossed seeds × items analysis" in md
    assert "Satterthwaite degrees of freedom" in md and "Holm" in md
    assert "math-sft-n1000: LoRA seed(s) 1 finished without the other init: left out of Δ" in md
    out = capsys.readouterr().out
    assert "math · SFT · gsm8k" in out and "deltas.csv" in out and "math_sft_vs_n.png" in out


def test_csv_has_one_row_per_cell_and_metric(run, no_plots):
    exp, layout = run
    report(exp, layout)
    with layout.report_dir.joinpath("results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(MATH) * 3 + len(TITLES) * 5  # items counts are not metrics
    assert list(rows[0]) == ["cell_id", "task", "method", "init", "n", "seed", "suite", "role", "metric", "value",
                             "arm", "n_trained", "prompt_version", "scorer_version", "code"]
    row = next(r for r in rows if r["cell_id"] == "math-sft-d2lora-n100-s1" and r["metric"] == "accuracy"
               and r["suite"] == "gsm8k")
    assert (row["task"], row["method"], row["init"], row["n"], row["seed"], row["role"], float(row["value"])) == (
        "math", "sft", "d2lora", "100", "1", "task", 0.28)
    assert row["arm"] == "d2lora"  # no warm-up or LoRA-init axis: the arm is the init
    assert {r["role"] for r in rows if r["suite"] == "arc_easy"} == {"forgetting"}


def test_deltas_csv_has_every_metric_with_what_it_rests_on(run, no_plots):
    exp, layout = run
    report(exp, layout)
    rows = deltas_csv(layout)
    assert tuple(rows[0]) == DELTAS_CSV_COLUMNS
    assert DELTAS_CSV_COLUMNS[:12] == ("task", "method", "n", "suite", "metric", "delta", "ci_low", "ci_high",
                                       "seeds", "items", "differing_items", "resolved")
    row = delta_row(rows, "math", "sft", 100, "gsm8k", "accuracy")
    assert float(row["delta"]) == pytest.approx(0.04, abs=1e-6)
    assert float(row["ci_low"]) <= 0.04 <= float(row["ci_high"])
    assert (row["seeds"], row["items"], row["basis"]) == ("2", "100", "items")
    # Items scored differently, counted here from the fixture's own construction.
    differing = sum(symmetric_difference(math_items(f"math-sft-lora-n100-s{s}", *MATH[f"math-sft-lora-n100-s{s}"])
                                         ["gsm8k"]["accuracy"],
                                         math_items(f"math-sft-d2lora-n100-s{s}", *MATH[f"math-sft-d2lora-n100-s{s}"])
                                         ["gsm8k"]["accuracy"]) for s in (0, 1))
    assert row["differing_items"] == str(differing) == "20"  # 3 + 6 on seed 0, 3 + 8 on seed 1
    assert row["resolved"] == str(excludes_zero((float(row["ci_low"]), float(row["ci_high"])))).lower()
    assert (row["state"], row["role"]) == ("resolved" if row["resolved"] == "true" else "unresolved", "primary")
    assert float(row["p_value"]) < 0.05 if row["resolved"] == "true" else float(row["p_value"]) >= 0.05
    assert float(row["se"]) > 0 and float(row["mde"]) > float(row["se"]) and row["p_holm"] == ""
    assert delta_row(rows, "math", "sft", 1000, "gsm8k", "accuracy")["state"] == "too few seeds"
    # n = 0 is one line, method none (as in results.csv); arc's second metric is there too.
    assert [r["method"] for r in rows if r["n"] == "0" and r["task"] == "math" and r["suite"] == "gsm8k"] == ["none"]
    norm = delta_row(rows, "math", "none", 0, "arc_easy", "accuracy_norm")
    assert float(norm["delta"]) == pytest.approx(0.01, abs=1e-6)
    no_pair = delta_row(rows, "math", "dpo", 1000, "gsm8k", "accuracy")
    assert (no_pair["delta"], no_pair["ci_low"], no_pair["resolved"], no_pair["basis"]) == ("", "", "false", "none")
    assert no_pair["note"].startswith("no seed finished on both sides")
    assert not [r for r in rows if r["n"] == "2000"]  # nothing finished there: no line


# ---- the interval in the report (report.stats is tested on its own in test_report_stats.py) -------------

def binomial_quantile(m: int, p: float, q: float) -> int:
    """Smallest k with P(Binomial(m, p) <= k) >= q, summed exactly."""
    total = 0.0
    for k in range(m + 1):
        total += math.comb(m, k) * p**k * (1 - p) ** (m - k)
        if total >= q:
            return k
    return m


def test_paired_interval_uses_the_same_items_for_both_arms(empty_run, no_plots):
    """Arms that agree except 30 of 1000 items D2LoRA gets right and LoRA wrong (n = 0, one run per
    arm): the paired t interval over items is close to Binomial(1000, 0.03) / 1000's 2.5% and 97.5%
    points (about [2.0, 4.1] points). Unpaired arms (sd ~2.2 points each) would straddle 0."""
    exp, layout = empty_run
    rng = np.random.default_rng(3)
    lora = (rng.random(1000) < 0.5).astype(float)
    wrong = np.flatnonzero(lora == 0)[:30]
    d2lora = lora.copy()
    d2lora[wrong] = 1.0
    sft_cells(layout, 0, [(lora.tolist(), d2lora.tolist())])  # D2LoRA rows are written in reverse order
    report(exp, layout)
    row = delta_row(deltas_csv(layout), "math", "none", 0, "gsm8k", "accuracy")
    assert float(row["delta"]) == pytest.approx(0.03, abs=1e-9)
    assert float(row["ci_low"]) == pytest.approx(binomial_quantile(1000, 0.03, 0.025) / 1000, abs=0.0015)
    assert float(row["ci_high"]) == pytest.approx(binomial_quantile(1000, 0.03, 0.975) / 1000, abs=0.0015)
    assert (row["resolved"], row["differing_items"], row["seeds"], row["items"]) == ("true", "30", "1", "1000")


def test_unpaired_seeds_are_left_out(run, no_plots):
    """(d) A D2LoRA seed 2 without its LoRA partner does not change Δ, and the report says so."""
    exp, layout = run
    before = report(exp, layout)
    before_row = delta_row(deltas_csv(layout), "math", "sft", 100, "gsm8k", "accuracy")
    write_cell(layout, "math-sft-d2lora-n100-s2", math_items("math-sft-d2lora-n100-s2", 0.90, 0.90))
    after = report(exp, layout)
    after_row = delta_row(deltas_csv(layout), "math", "sft", 100, "gsm8k", "accuracy")
    assert after_row == before_row | {"note": after_row["note"]}
    assert after_row["seeds"] == "2" and "D2LoRA seed(s) 2 finished without the other init" in after_row["note"]
    key = "math · SFT · gsm8k (task suite)"
    assert table(after.markdown, key)["Δ (D2LoRA − LoRA)"] == table(before.markdown, key)["Δ (D2LoRA − LoRA)"]
    assert table(after.markdown, key)["D2LoRA"][1] != table(before.markdown, key)["D2LoRA"][1]  # the arm mean moves


def test_resolved_only_when_the_interval_excludes_zero(empty_run, no_plots):
    """(e) n = 100 (the primary comparison): 30 and 25 of 100 items won, nothing lost -> interval well
    above 0, resolved. n = 1000: seed 0 identical, seed 1 every item won -> seed means 0 and 1; the
    old bootstrap gave exactly [0, 1], a t over the two seeds gives 0.5 ± 12.71 · 0.5. n = 2000: one
    item won, one lost -> contains 0. Both exploratory, Holm over the two."""
    exp, layout = empty_run
    base = hits(0.5)
    sft_cells(layout, 100, [(base, hits(0.8)), (base, hits(0.75))])
    sft_cells(layout, 1000, [(base, base), ([0.0] * M, [1.0] * M)])
    sft_cells(layout, 2000, [(base, hits(0.5, start=1)), (base, hits(0.5, start=2))])
    result = report(exp, layout)
    delta = table(result.markdown, "math · SFT · gsm8k")["Δ (D2LoRA − LoRA)"]
    resolved = parse_delta(delta[1])
    assert resolved["bold"] and resolved["lo"] > 0 and resolved["rest"].endswith("· resolved (primary)")
    assert delta[2] == ("+50.00 [-585.31, +685.31] · 2 seeds × 100 items · MDE 704.13 · "
                        "unresolved (exploratory, Holm-adjusted p 1.000 over 2 Δ)")
    crossing = parse_delta(delta[3])
    assert crossing["delta"] == 0.0 and crossing["lo"] < 0 < crossing["hi"] and not crossing["bold"]
    rows = deltas_csv(layout)
    assert [delta_row(rows, "math", "sft", n, "gsm8k", "accuracy")["resolved"] for n in (100, 1000, 2000)] == [
        "true", "false", "false"]
    assert not excludes_zero((0.0, 0.3)) and not excludes_zero((-0.2, 0.0)) and not excludes_zero(None)
    assert excludes_zero((1e-9, 0.3)) and excludes_zero((-0.2, -1e-9))


def test_identical_arms_say_identical_outputs(empty_run, no_plots):
    """(f) A phase that did not move the model: every item scored the same by both inits."""
    exp, layout = empty_run
    sft_cells(layout, 0, [(hits(0.4), hits(0.4))])
    sft_cells(layout, 100, [(hits(0.4), hits(0.4)), (hits(0.3), hits(0.3, start=5))])
    result = report(exp, layout)
    delta = table(result.markdown, "math · SFT · gsm8k")["Δ (D2LoRA − LoRA)"]
    assert delta[0] == ("+0.00 [+0.00, +0.00] · 1 seed × 100 items · MDE 0.00 · 1 seed: test-set noise only · "
                        "identical outputs · unresolved (exploratory, Holm-adjusted p 1.000 over 1 Δ)")
    assert "identical outputs" not in delta[1]  # same accuracy, different items
    rows = deltas_csv(layout)
    assert delta_row(rows, "math", "none", 0, "gsm8k", "accuracy")["differing_items"] == "0"
    assert delta_row(rows, "math", "sft", 100, "gsm8k", "accuracy")["differing_items"] == "10"


# ---- when item scores are not there ------------------------------------------------------------

def test_missing_unreadable_or_unknown_item_scores_fall_back_to_seed_level(run, no_plots):
    exp, layout = run
    layout.cell_predictions("math-sft-lora-n100-s1", "gsm8k").unlink()
    layout.cell_predictions("math-sft-d2lora-n1000-s0", "gsm8k").write_text("{not json\n")
    # A metric result.json has but item_scores does not know, on both arms of n = 0.
    for cell_id in ("math-none-lora-n0-s0", "math-none-d2lora-n0-s0"):
        gsm, arc = MATH[cell_id]
        write_cell(layout, cell_id, math_items(cell_id, gsm, arc),
                   extra={"gsm8k": {"exact_match": gsm / 2}})
    result = report(exp, layout)
    delta = table(result.markdown, "math · SFT · gsm8k")["Δ (D2LoRA − LoRA)"]
    # n = 100: seed level over the 2 paired seeds: per-seed differences 0.03 and 0.05 -> a t over two
    # seeds, 4 ± 12.71 · 1, MDE (12.71 + 1.38) · 1 (the old [min, max] = [3, 5] called it resolved).
    assert delta[1] == "+4.00 [-8.71, +16.71] · 2 seeds, seed-level only · MDE 14.08 · unresolved (primary)"
    assert delta[2] == "+3.00 · 1 seed, seed-level only · no interval"
    assert " · 1 seed: test-set noise only · " in delta[0] and delta[0].startswith("+2.00 [")  # still has items
    notes = result.markdown.split("## Notes on Δ", 1)[1]
    assert "cells/math-sft-lora-n100-s1/predictions/gsm8k.jsonl: missing" in notes
    assert "cells/math-sft-d2lora-n1000-s0/predictions/gsm8k.jsonl: unreadable (InputError:" in notes
    assert "gsm8k: evaluate.scoring.item_scores gives no per-item 'exact_match'" in notes
    rows = deltas_csv(layout)
    exact = delta_row(rows, "math", "none", 0, "gsm8k", "exact_match")
    assert (exact["basis"], exact["ci_low"], exact["differing_items"], exact["resolved"]) == ("seeds", "", "", "false")
    assert float(exact["delta"]) == pytest.approx(0.01)
    assert "seed level only: gsm8k: evaluate.scoring.item_scores gives no per-item 'exact_match'" in exact["note"]
    seed_level = delta_row(rows, "math", "sft", 100, "gsm8k", "accuracy")
    assert (seed_level["basis"], seed_level["items"]) == ("seeds", "")
    assert "math-sft-lora-n100-s1/predictions/gsm8k.jsonl: missing" in seed_level["note"]
    # The forgetting suite of the same cells still has its items.
    assert delta_row(rows, "math", "sft", 100, "arc_easy", "accuracy")["basis"] == "items"


def test_item_scores_that_disagree_with_result_json_are_not_used(run, no_plots):
    exp, layout = run
    path = layout.cell_predictions("math-sft-lora-n100-s0", "gsm8k")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[50] |= {"correct": True, "correct_strict": True, "correct_flexible": True}  # was wrong
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(exp, layout)
    row = delta_row(deltas_csv(layout), "math", "sft", 100, "gsm8k", "accuracy")
    assert row["basis"] == "seeds"
    assert "item scores of accuracy average 0.220000 but result.json says 0.210000" in row["note"]


def test_item_ids_that_differ_are_reported_naming_both_cells(empty_run, no_plots):
    exp, layout = empty_run
    sft_cells(layout, 100, [(hits(0.5), hits(0.6))])
    path = layout.cell_predictions("math-sft-d2lora-n100-s0", "gsm8k")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] not in ("gsm8k-0", "gsm8k-99")))
    result_path = layout.cell_result("math-sft-d2lora-n100-s0")
    result = json.loads(result_path.read_text())
    result["metrics"]["gsm8k"]["accuracy"] = 59 / 98  # consistent with the rows left
    result_path.write_text(json.dumps(result))
    result = report(exp, layout)
    row = delta_row(deltas_csv(layout), "math", "sft", 100, "gsm8k", "accuracy")
    assert row["items"] == "98" and row["basis"] == "items"
    # Items 1..49 right on both arms, 50..59 right only with D2LoRA, over the 98 common items.
    assert float(row["delta"]) == pytest.approx(10 / 98, abs=1e-6)  # deltas.csv has 6 decimals
    note = ("gsm8k: item ids differ between math-sft-lora-n100-s0 (2 only there) and math-sft-d2lora-n100-s0 "
            "(0 only there); Δ uses the 98 common items")
    assert note in row["note"] and note in result.markdown


# ---- plots -------------------------------------------------------------------------------------

def png_size_and_not_blank(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
        size = img.size
    assert pixels.std() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2
    return size


def test_plots_are_png_of_expected_size_and_not_blank(run):
    exp, layout = run
    result = report(exp, layout)
    sizes = {p.name: png_size_and_not_blank(p) for p in result.plots}
    with_delta_row = (640, 640)  # 400 px of values, 240 px of Δ under them
    assert sizes == {"math_sft_vs_n.png": with_delta_row, "math_dpo_vs_n.png": with_delta_row,
                     "math_orpo_vs_n.png": with_delta_row, "math_methods_lora.png": (640, 400),
                     "math_forgetting.png": with_delta_row, "math_low_data.png": with_delta_row,
                     "math_delta_vs_n.png": (3 * 640, 400), "titles_sft_vs_n.png": with_delta_row,
                     "titles_methods_lora.png": (640, 400), "titles_forgetting.png": with_delta_row,
                     "titles_delta_vs_n.png": (640, 400)}
    assert {p.parent for p in result.plots} == {layout.report_dir / "plots"}


def test_trend_lines_join_only_neighbouring_resolved_points():
    assert joined_runs([True, True, False, True, None, True, True, True]) == [[0, 1], [5, 6, 7]]
    assert joined_runs([True, False, True]) == []
    assert joined_runs([None, True, True]) == [[1, 2]]
    assert joined_runs([]) == []


def test_delta_plot_draws_unresolved_points_hollow_and_unjoined(empty_run):
    """(g) n = 0 identical and n = 2000 a wash (unresolved), n = 100 (primary) and 1000 (exploratory,
    resolved after Holm) clear gains: one trend line through positions 1 and 2 only, hollow grey
    points at 0 and 3, each point that is not a resolved primary comparison labelled in words."""
    exp, layout = empty_run
    base = hits(0.5)
    sft_cells(layout, 0, [(base, base)])
    sft_cells(layout, 100, [(base, hits(0.8)), (base, hits(0.75))])
    sft_cells(layout, 1000, [(base, hits(0.9)), (base, hits(0.85))])
    sft_cells(layout, 2000, [(base, hits(0.5, start=1)), (base, hits(0.5, start=2))])
    result = report(exp, layout)
    delta_png = next(p for p in result.plots if p.name == "math_delta_vs_n.png")
    assert png_size_and_not_blank(delta_png) == (3 * 640, 400)  # SFT, DPO and ORPO panels

    coll = collect(exp, layout)
    deltas = Deltas(coll, load_item_scores(exp, layout, coll), exp.report.min_seeds, primary_keys(exp))
    spec = next(s for s in table_specs(exp, coll) if (s.method, s.suite) == ("sft", "gsm8k"))
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    assert delta_panel(ax, deltas, [spec]) == 1
    trends = [line for line in ax.get_lines() if line.get_gid() == TREND]
    assert len(trends) == 1
    assert np.round(trends[0].get_xdata()).tolist() == [1, 2]
    hollow = [line for line in ax.get_lines() if line.get_gid() == UNRESOLVED]
    assert sorted(np.round(line.get_xdata()[0]) for line in hollow) == [0, 3]
    assert all(line.get_markerfacecolor() == "none" for line in hollow)
    filled = [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_gid() is None
              and len(line.get_xdata())]
    assert sorted(np.round(line.get_xdata()[0]) for line in filled) == [1, 2]
    assert any(line.get_ydata()[0] == 0 and line.get_ydata()[-1] == 0 for line in ax.get_lines())  # zero line
    # every Δ with an interval draws it, at its n, from its lower to its upper bound (in points)
    drawn = sorted((round(float(seg[0][0])), round(float(seg[0][1]), 6), round(float(seg[1][1]), 6))
                   for c in ax.collections if c.get_gid() == INTERVAL for seg in c.get_segments())
    expected = sorted((i, round(d.ci[0] * 100, 6), round(d.ci[1] * 100, 6))
                      for i, n in enumerate(spec.ns)
                      if (d := deltas.get(spec.task, "sft", n, "gsm8k", spec.metrics[0][0])).ci is not None)
    assert drawn == expected and len(drawn) >= 3
    # each unresolved one says so in words next to it, and so does the exploratory one resolved after Holm
    labels = [a for a in ax.texts if a.get_gid() == UNRESOLVED]
    assert sorted(round(a.xy[0]) for a in labels) == [0, 3]
    assert {a.get_text() for a in labels} == {"unresolved (Holm)"}
    assert [(round(a.xy[0]), a.get_text()) for a in ax.texts if a.get_gid() is None] == [(2, "resolved (Holm)")]


# ---- the rest of the report ----------------------------------------------------------------------

def test_writes_are_atomic_and_leave_other_files(run):
    exp, layout = run
    layout.report_dir.mkdir(parents=True)
    keep = layout.report_dir / "notes.txt"
    keep.write_text("mine")
    first = report(exp, layout)
    first_deltas = layout.report_dir.joinpath("deltas.csv").read_text()
    second = report(exp, layout)
    assert keep.read_text() == "mine"
    assert first.markdown == second.markdown  # the bootstrap is seeded
    assert layout.report_dir.joinpath("deltas.csv").read_text() == first_deltas
    leftovers = [p for p in layout.report_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_unplanned_results_are_reported_and_bad_values_stop(run, no_plots):
    exp, layout = run
    write_result(layout, "math-sft-lora-n500-s0", {"gsm8k": {"accuracy": 0.5}}, {"gsm8k": "task"})
    result = report(exp, layout)
    assert result.unplanned == ["math-sft-lora-n500-s0"]
    assert "1 finished cells are not in the current plan" in result.markdown
    assert table(result.markdown, "math · SFT · gsm8k")["n"] == ["0", "100", "500", "1000", "2000"]

    write_result(layout, "math-sft-lora-n2000-s0", {"gsm8k": {"accuracy": 25.0}}, {"gsm8k": "task"})
    with pytest.raises(ValueError, match=r"metrics\.gsm8k\.accuracy = 25\.0"):
        report(exp, layout)


def test_no_results_yet(empty_run):
    exp, layout = empty_run
    result = report(exp, layout)
    assert result.done == 0 and result.plots == []
    assert f"**0 of {PLANNED} planned cells done**" in result.markdown
    assert table(result.markdown, "math · SFT · gsm8k")["LoRA"] == ["—"] * 4
    assert table(result.markdown, "math · SFT · gsm8k")["Δ (D2LoRA − LoRA)"] == ["—"] * 4
    assert deltas_csv(layout) == []


def test_mean_std():
    assert mean_std([0.24, 0.26]) == pytest.approx((0.25, 0.0141421356))
    assert mean_std([0.3]) == (0.3, None)


def test_wandb_report_offline_says_what_and_how(run, no_plots, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    exp, layout = run
    result = report(exp, layout, wandb_report=True)
    text = "\n".join(result.wandb)
    assert "W&B is offline: nothing published" in text
    assert "'D2LoRA: report_fixture'" in text
    assert "math · SFT · gsm8k (task suite)" in text  # a table
    assert "scatter panel 'gsm8k accuracy vs n': eval/gsm8k/accuracy vs cell.n" in text
    assert "line panel 'training loss': train/loss vs train/global_step" in text
    assert f"wandb sync {layout.wandb_dir}/offline-run-*" in text
    assert f"d2lora report -c {layout.experiment_file} --wandb-report" in text


def test_wandb_report_builds_with_wandb_workspaces(run):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    exp, layout = run
    coll = collect(exp, layout)
    specs = table_specs(exp, coll)
    plan = plan_report(exp, specs, "# tables", [], len(coll.done), len(coll.planned))
    plan.entity = "someone"
    built = build(plan, wr)
    assert built.title == "D2LoRA: report_fixture"
    grids = [b for b in built.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 4  # math sft/dpo/orpo, titles sft
    assert [r.name for r in grids[0].runsets] == ["LoRA", "D2LoRA"]
    expr = pytest.importorskip("wandb_workspaces.expr")
    parsed = expr.expr_to_filters(plan.sections[0].runsets[0].filters)  # what save() sends
    assert [(f.key.name, f.op, f.value) for f in parsed.filters] == [
        ("group", "=", "report_fixture"), ("cell.task", "=", "math"), ("cell.method", "IN", ["sft", "none"]),
        ("cell.init", "=", "lora")]
    panels = grids[0].panels
    assert isinstance(panels[0], wr.ScatterPlot) and panels[0].y == wr.SummaryMetric("eval/gsm8k/accuracy")
    assert isinstance(panels[-1], wr.LinePlot) and panels[-1].y == ["train/tokens_per_s"]
