"""One preflight before any model loads: data against n + holdout, suites, batches, Slurm; all at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.cli import main
from d2lora_dist.config import experiment_from_dict, load_experiment
from d2lora_dist.preflight import PreflightError, for_sweep, preflight, slurm_problems, slurm_seconds
from d2lora_dist.sweep.grid import plan_cells
from tests.conftest import REPO, write_experiment


def _problems(exp, slurm: bool = False) -> list[str]:
    with pytest.raises(PreflightError) as err:
        preflight(exp, for_sweep(exp, plan_cells(exp), slurm), "exp.yaml")
    return err.value.problems


def test_every_problem_is_reported_at_once_naming_its_key(tiny_experiment: dict) -> None:
    tiny_experiment["grid"][0]["n"] = [4, 41]  # 40 math rows
    tiny_experiment["warmup"]["n"] = 25  # 24 warm-up rows
    tiny_experiment["suites"]["gsm8k"]["limit"] = 9  # 8 items
    tiny_experiment["methods"]["dpo"]["global_batch_size"] = 3  # per device 2: no world size makes 3
    tiny_experiment["slurm"] = {"time": "00:04:00", "signal_seconds": 300}
    problems = _problems(experiment_from_dict(tiny_experiment), slurm=True)
    assert "math-dpo-d2lora-n41-s0: n=41 but task 'math' has only 40 usable preference rows" in problems[0]
    assert any(p.startswith("warmup.n: 25 but orpo_dpo_mix has only 24 usable SFT rows") for p in problems)
    assert any(p.startswith("suites.gsm8k.limit: 9 but the suite has only 8 items") for p in problems)
    assert any(p.startswith("methods.dpo.global_batch_size=3 is not a multiple of methods.dpo.per_device_batch_size"
                            " (2) x world size (1)") for p in problems)
    assert any(p.startswith("slurm.signal_seconds: 300 s is not below slurm.time") for p in problems)
    assert len([p for p in problems if "-n4-" in p]) == 0


def test_held_out_rows_count_against_n(tiny_experiment: dict) -> None:
    tiny_experiment["grid"] = [{"task": "titles", "methods": ["sft"], "n": [18, 19], "seeds": [0]}]
    problems = _problems(experiment_from_dict(tiny_experiment))  # 24 title rows, 6 held out
    assert problems == [f"titles-sft-{init}-n19-s0: n=19 but task 'titles' has only 18 usable sft rows "
                        "(econ_abstracts, 6 held out); lower n in the grid or add data" for init in ("d2lora", "lora")]


def test_a_world_size_that_cannot_make_the_global_batch_is_refused(tiny_experiment: dict) -> None:
    tiny_experiment["launch"] = {"num_processes": 3}  # global batch 2 over 3 ranks
    problems = _problems(experiment_from_dict(tiny_experiment))
    assert any("warmup.train.global_batch_size=2 is not a multiple" in p and "world size (3)" in p for p in problems)
    assert any(p.startswith("methods.sft.global_batch_size=2") for p in problems)


PAPER_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def hub_cache_holding(root: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache in which `repo_id` has its config.json, laid out as `hf download` leaves it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    shape = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336}  # Llama-3.1-8B's
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(shape))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def paper_model_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The paper's model in the hub cache the Slurm jobs read (HF_HUB_CACHE of the submitting shell)."""
    import huggingface_hub.constants  # noqa: F401  reads this machine's cache location before it changes here
    cache = hub_cache_holding(tmp_path / "hf" / "hub", PAPER_MODEL)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_slurm_time_formats_and_requests(paper_model_cached: Path) -> None:
    assert slurm_seconds("08:00:00") == 8 * 3600 and slurm_seconds("1-00:00:00") == 86400
    assert slurm_seconds("30") == 1800 and slurm_seconds("10:30") == 630 and slurm_seconds("8h") is None
    exp = load_experiment(REPO / "launch/experiments/paper_math.yaml", ["slurm.gpus_per_node=4", "slurm.time=8h"])
    problems = slurm_problems(exp)
    assert any("launch.num_processes: 8 ranks per node but slurm.gpus_per_node asks for 4" in p for p in problems)
    assert any("slurm.time: '8h' is not a Slurm time" in p for p in problems)
    assert slurm_problems(load_experiment(REPO / "launch/experiments/paper_math.yaml")) == []


@pytest.mark.parametrize("entry", [["warmup"], ["sweep", "plan"], ["sweep", "run"], ["sweep", "submit", "--dry-run"],
                                   ["adapt", "--task", "math", "--method", "dpo", "--init", "lora", "--n", "41"],
                                   ["eval", "--task", "math"]])
def test_every_entry_runs_the_preflight_before_any_model_loads(entry: list[str], tiny_experiment: dict,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["grid"][0]["n"] = [4, 41]
    tiny_experiment["warmup"]["n"] = 25
    tiny_experiment["suites"]["arc_easy"]["limit"] = 9
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main([*entry, "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "d2lora: error:" in err and str(path) in err
    expected = {"warmup": "warmup.n: 25", "eval": "suites.arc_easy.limit: 9"}.get(entry[0], "n=41 but task 'math'")
    assert expected in err
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written


def _table(path: Path, rows: int, kind: str) -> str:
    if kind == "titles":
        lines = [{"abstract": f"We study topic {i} in depth.", "title": f"Topic {i}"} for i in range(rows)]
    else:
        lines = [{"prompt": f"What is {i} + 1?", "initial_reason_steps": "Step 1: add.\n", "chosen": f"{i + 1}",
                  "rejected": f"{i + 2}", "full_chosen": f"{i + 1}. The answer is {i + 1}",
                  "full_rejected": f"{i + 2}. The answer is {i + 2}", "answer": str(i + 1)} for i in range(rows)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _paper_math_on_local_files(tmp_path: Path, tiny_data: dict, math_rows: int) -> list[str]:
    """`-c paper_math.yaml` and the --set arguments that point its datasets at local files (a math table of
    `math_rows` rows) and its output into tmp_path."""
    return ["-c", str(REPO / "launch/experiments/paper_math.yaml"),
            "--set", f"tasks.math.dataset.data_files=[{_table(tmp_path / 'math.jsonl', math_rows, 'math')}]",
            "--set", f"suites.gsm8k.dataset.data_files=[{tiny_data['gsm8k']}]",
            "--set", f"suites.arc_easy.dataset.data_files=[{tiny_data['arc']}]", "--set", f"output_dir={tmp_path}"]


def test_paper_title_preset_fits_the_6362_row_table_and_7000_would_not(tmp_path: Path, tiny_data: dict,
                                                                      tiny_model_dir: Path) -> None:
    local = [f"tasks.titles.dataset.data_files=[{_table(tmp_path / 'econ.jsonl', 6362, 'titles')}]",
             f"suites.arc_easy.dataset.data_files=[{tiny_data['arc']}]",
             f"model.name_or_path={tiny_model_dir}"]  # on this machine: compute nodes must read the model too
    exp = load_experiment(REPO / "launch/experiments/paper_title.yaml", local)
    preflight(exp, for_sweep(exp, plan_cells(exp), slurm=True), "paper_title.yaml")  # passes
    exp.grid[0].n = [0, 7000]
    problems = _problems(exp, slurm=True)
    assert all("n=7000 but task 'titles' has only 6262 usable sft rows" in p for p in problems)
    assert len(problems) == 6  # 2 inits x 3 seeds, every one named


def test_submit_dry_run_refuses_the_cells_a_small_table_cannot_hold(tmp_path: Path, tiny_data: dict,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "submit", "--dry-run", *_paper_math_on_local_files(tmp_path, tiny_data, 1500)]) == 2
    err = capsys.readouterr().err
    too_big = [line for line in err.splitlines() if "usable" in line]
    assert len(too_big) == 3 * 3 * 2 * 3  # n = 2k, 5k, 10k x 3 methods x 2 inits x 3 seeds
    assert "#SBATCH" not in err and not (tmp_path / "paper_math").exists()


def test_eval_on_a_task_the_experiment_lacks_is_named(tiny_experiment: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main(["eval", "-c", str(path), "--task", "titels"]) == 2
    assert "--task 'titels': not a task of the experiment (['math', 'titles'])" in capsys.readouterr().err


# ---- what Slurm jobs need: GPUs for a GPU launch, a model they can read --------------------------
def test_a_gpu_launch_without_gpus_per_node_is_refused_naming_the_key(paper_model_cached: Path) -> None:
    paper = REPO / "launch/experiments/paper_math.yaml"
    problems = slurm_problems(load_experiment(paper, ["slurm.gpus_per_node=0", "launch.num_processes=1"]))
    assert problems == ["launch.strategy: auto sizes the launch for GPUs (launch.gpu_memory_gib) but slurm.gpus_per_node "
                        "is 0, so the jobs would get no GPU; set slurm.gpus_per_node to the GPUs of one node (e.g. 8), "
                        "or drop launch.strategy and name a CPU launch (launch.accelerate_config: "
                        "launch/accelerate/cpu_2proc_ddp.yaml)"]
    named = ["slurm.gpus_per_node=0", "launch.num_processes=1", "launch.strategy=null"]
    problems = slurm_problems(load_experiment(paper, [*named, "launch.accelerate_config=launch/accelerate/ddp.yaml"]))
    assert len(problems) == 1 and problems[0].startswith("launch.accelerate_config: launch/accelerate/ddp.yaml "
                                                         "launches on GPUs")
    cpu = slurm_problems(load_experiment(paper, [*named, "launch.accelerate_config=launch/accelerate/cpu_2proc_ddp.yaml"]))
    assert cpu == []  # use_cpu: true
    # nothing named: the model's estimate picks the launch; at 32 GiB per GPU the 8B model needs ZeRO-3
    problems = slurm_problems(load_experiment(paper, [*named, "launch.gpu_memory_gib=32", "launch.num_processes=8"]))
    assert len(problems) == 1 and problems[0].startswith(f"model.name_or_path: the memory estimate of {PAPER_MODEL} "
                                                         "needs zero3 on 8 GPU(s) (launch.gpu_memory_gib=32)")
    assert "slurm.gpus_per_node is 0" in problems[0]


def test_a_hub_model_the_jobs_cannot_read_is_refused_naming_the_cache(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants  # noqa: F401  reads this machine's cache location before it changes here

    paper = REPO / "launch/experiments/paper_math.yaml"
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    problems = slurm_problems(load_experiment(paper))
    assert problems == [f"model.name_or_path: hub id '{PAPER_MODEL}' is not in the Hugging Face cache the Slurm jobs "
                        f"read ({tmp_path}/empty/hub, HF_HOME of this shell); download it once into a shared HF_HOME "
                        f"where the hub is reachable (HF_HOME=/shared/hf hf download {PAPER_MODEL}) and give it to the "
                        "jobs (slurm.setup: [\"export HF_HOME=/shared/hf\", \"export HF_HUB_OFFLINE=1\"]), or set "
                        "model.name_or_path to a local directory on a shared file system"]
    hub_cache_holding(tmp_path / "shared" / "hub", PAPER_MODEL)  # the jobs' HF_HOME, set in slurm.setup
    setup = f'slurm.setup=["module load cuda", "export HF_HOME={tmp_path}/shared", "export HF_HUB_OFFLINE=1"]'
    assert slurm_problems(load_experiment(paper, [setup])) == []
    other = f'slurm.setup=["export HF_HOME={tmp_path}/elsewhere"]'  # the shell has it, the jobs would not
    monkeypatch.setenv("HF_HOME", str(tmp_path / "shared"))
    problems = slurm_problems(load_experiment(paper, [other]))
    assert len(problems) == 1 and f"({tmp_path}/elsewhere/hub, HF_HOME in slurm.setup)" in problems[0]


def test_sweep_plan_shows_what_sweep_submit_would_refuse(tiny_experiment: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["launch"] = {"strategy": "auto"}  # GPU-sized, and slurm.gpus_per_node is left at 0
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main(["sweep", "plan", "-c", str(path)]) == 0  # a plan for this machine still works
    out = capsys.readouterr().out
    assert out.count("sweep submit would refuse: ") == 1
    assert "sweep submit would refuse: launch.strategy: auto sizes the launch for GPUs" in out
    assert main(["sweep", "submit", "--dry-run", "-c", str(path)]) == 2
    assert "launch.strategy: auto sizes the launch for GPUs" in capsys.readouterr().err
    del tiny_experiment["launch"]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main(["sweep", "plan", "-c", str(path)]) == 0
    assert "sweep submit would refuse" not in capsys.readouterr().out


def test_a_missing_hub_model_is_named_once_when_the_jobs_read_this_machines_cache(
        tmp_path: Path, tiny_data: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sweep", "submit", "--dry-run", *_paper_math_on_local_files(tmp_path, tiny_data, 20000)]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and err.count(f"hub id '{PAPER_MODEL}'") == 1, err


def test_evaluation_rows_the_normaliser_drops_are_named(tiny_experiment: dict, tiny_data: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """An evaluation item without its answer is not evaluated; the run says so before anything trains,
    naming the suite, the file, the row and the reason (a suite's item count would otherwise shrink
    unnoticed)."""
    rows = [json.loads(line) for line in Path(tiny_data["gsm8k"]).read_text().splitlines()]
    del rows[2]["answer"]
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_experiment["suites"]["gsm8k"]["dataset"]["data_files"] = [str(gsm8k)]
    exp = experiment_from_dict(tiny_experiment)
    preflight(exp, for_sweep(exp, plan_cells(exp), False), "exp.yaml")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: suites.gsm8k")]
    assert len(said) == 1 and str(gsm8k) in said[0] and "1 of 8 rows dropped" in said[0], said
    assert "missing answer (row-2)" in said[0], said


def test_sweep_plan_shows_every_slurm_setting_sweep_submit_would_refuse(tiny_experiment: dict, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    tiny_experiment["slurm"] = {"max_parallel": 0, "time": "8h"}
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    assert main(["sweep", "plan", "-c", str(path)]) == 0  # the local plan still works
    out = capsys.readouterr().out
    assert "sweep submit would refuse: slurm.max_parallel: must be >= 1, got 0" in out
    assert "sweep submit would refuse: slurm.time: '8h' is not a Slurm time" in out
    assert main(["sweep", "submit", "--dry-run", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "slurm.max_parallel: must be >= 1, got 0" in err and "slurm.time: '8h'" in err
