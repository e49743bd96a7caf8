"""Rendering of the sbatch scripts (pure functions) and the submission plan, no cluster needed.

The recorded scripts in tests/fixtures/slurm/ were reviewed by eye; re-record after an
intended template change with D2LORA_RECORD_SLURM_FIXTURES=1 and review the diff.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.errors import InputError
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep import slurm
from d2lora_dist.sweep.plan import freeze_plan
from d2lora_dist.sweep.preemption import PREEMPTED_EXIT_CODE
from tests.slurm_cluster import experiment_dict

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"
RUN = RunLayout(Path("/shared/runs/paper_math"))


def paper_two_nodes(**launch: object):
    """2 nodes x 8 GPUs for the warm-up, one 8-GPU node per cell, ZeRO-3 through accelerate."""
    data = experiment_dict(
        "paper_math", "/shared/runs", partition="gpu", account="proj123", qos="normal", nodes=2,
        gpus_per_node=8, cpus_per_task=64, mem="480G", time="12:00:00", constraint="h100",
        max_parallel=4, signal_seconds=600, extra_sbatch=["--exclusive", "#SBATCH --mail-type=FAIL"],
        setup=["module load cuda/12.4", "source /shared/venvs/d2lora/bin/activate"])
    data["launch"] = {"accelerate_config": "launch/accelerate/zero3.yaml", "num_processes": 8, **launch}
    return experiment_from_dict(data)


def check_fixture(name: str, text: str) -> None:
    path = FIXTURES / name
    if os.environ.get("D2LORA_RECORD_SLURM_FIXTURES"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the recorded file (see module docstring)"


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_warmup_two_nodes_matches_recording_line_by_line():
    text = slurm.render_warmup(paper_two_nodes(), RUN)
    check_fixture("warmup_2x8.sbatch", text)
    assert sbatch_lines(text) == [
        "#SBATCH --job-name=d2lora-paper_math-warmup", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj123", "#SBATCH --qos=normal", "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64",
        "#SBATCH --mem=480G", "#SBATCH --time=12:00:00", "#SBATCH --constraint=h100", "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600", "#SBATCH --open-mode=append",
        "#SBATCH --output=/shared/runs/paper_math/slurm/logs/warmup-%j.out",
        "#SBATCH --error=/shared/runs/paper_math/slurm/logs/warmup-%j.err",
        "#SBATCH --exclusive", "#SBATCH --mail-type=FAIL"]
    lines = text.splitlines()
    # setup lines come after the header and before anything runs
    assert lines.index("module load cuda/12.4") < lines.index("source /shared/venvs/d2lora/bin/activate") \
        < lines.index("set -uo pipefail")
    assert 'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert any(x.startswith("MAIN_PROCESS_PORT=$(python3 -c 'import socket;") for x in lines)
    sruns = [x for x in lines if x.startswith("srun ")]
    assert sruns == ['srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 '
                     '--cpus-per-task=64 \\']  # one srun, one task per node
    step = lines[lines.index(sruns[0]) + 1]
    # single quotes: $SLURM_NODEID expands per node, not in the batch shell
    assert step.startswith("  bash -c 'trap \"\" USR1; exec accelerate launch ") and step.endswith("' &")
    for part in ("--config_file launch/accelerate/zero3.yaml", "--num_machines $SLURM_NNODES",
                 "--machine_rank $SLURM_NODEID", "--main_process_ip $MAIN_PROCESS_IP",
                 "--main_process_port $MAIN_PROCESS_PORT", "--num_processes $((SLURM_NNODES * 8))",
                 "--deepspeed_multinode_launcher standard",
                 "--no_python d2lora warmup -c /shared/runs/paper_math/experiment.yaml'"):
        assert part in step, part
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in lines
    assert lines[-1] == 'wait_step "$SLURM_JOB_ID"'


def test_cell_array_matches_recording_line_by_line():
    text = slurm.render_cell_array(paper_two_nodes(), RUN, [0, 1, 2, 3, 5, 7, 8])
    check_fixture("cell_array_2x8.sbatch", text)
    head = sbatch_lines(text)
    assert head[:2] == ["#SBATCH --job-name=d2lora-paper_math-cells", "#SBATCH --array=0-3,5,7-8%4"]
    assert "#SBATCH --nodes=1" in head and "#SBATCH --gpus-per-node=8" in head
    assert {"#SBATCH --requeue", "#SBATCH --signal=B:USR1@600", "#SBATCH --open-mode=append",
            "#SBATCH --output=/shared/runs/paper_math/slurm/logs/cell-%A_%a.out",
            "#SBATCH --error=/shared/runs/paper_math/slurm/logs/cell-%A_%a.err"} <= set(head)
    lines = text.splitlines()
    step = lines[lines.index("srun --nodes=1 --ntasks=1 --cpus-per-task=64 \\") + 1]
    assert step == ("  bash -c 'trap \"\" USR1; exec accelerate launch --config_file "
                    "launch/accelerate/zero3.yaml --num_machines 1 --num_processes 8 --main_process_port 0 "
                    "--no_python d2lora sweep cell -c /shared/runs/paper_math/experiment.yaml "
                    "--index $SLURM_ARRAY_TASK_ID' &")
    assert lines[-1] == 'wait_step "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'
    assert 'export D2LORA_PREEMPT_MARKER=/shared/runs/paper_math/slurm/preempted/"$SLURM_JOB_ID"' in lines


def test_report_matches_recording():
    text = slurm.render_report(paper_two_nodes(), RUN)
    check_fixture("report.sbatch", text)
    head = sbatch_lines(text)
    assert "#SBATCH --nodes=1" in head and not any("gpus" in x or "requeue" in x or "signal" in x
                                                    for x in head)
    assert text.splitlines()[-1] == "d2lora report -c /shared/runs/paper_math/experiment.yaml"


def test_the_report_job_asks_for_a_few_cpus_not_the_cells_gpu_node():
    head = sbatch_lines(slurm.render_report(paper_two_nodes(), RUN))
    # the cells' node is 64 CPUs, 480G, partition gpu, h100, --exclusive: none of it for tables and plots
    assert [x for x in head if not x.startswith(("#SBATCH --job-name", "#SBATCH --output", "#SBATCH --error"))] == [
        "#SBATCH --account=proj123", "#SBATCH --qos=normal", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=2", "#SBATCH --mem=8G", "#SBATCH --time=01:00:00"]
    data = experiment_dict("paper_math", "/shared/runs", partition="gpu", gpus_per_node=8, mem="480G",
                           extra_sbatch=["--exclusive"],
                           report={"partition": "cpu", "cpus_per_task": 4, "mem": "16G", "time": "2:00:00",
                                   "extra_sbatch": ["--mail-type=FAIL"]})
    head = sbatch_lines(slurm.render_report(experiment_from_dict(data), RUN))
    for line in ("--partition=cpu", "--cpus-per-task=4", "--mem=16G", "--time=2:00:00", "--mail-type=FAIL"):
        assert f"#SBATCH {line}" in head, line
    assert not any("gpu" in x or "exclusive" in x or "480G" in x for x in head)


def test_bad_report_resources_are_named_before_anything_is_submitted():
    from d2lora_dist.preflight import slurm_problems

    data = experiment_dict("demo", "/r", report={"time": "soon", "cpus_per_task": 0})
    problems = slurm_problems(experiment_from_dict(data))
    assert any(p.startswith("slurm.report.time: 'soon' is not a Slurm time") for p in problems), problems
    assert any(p.startswith("slurm.report.cpus_per_task: must be >= 1, got 0") for p in problems), problems
    with pytest.raises(InputError, match="slurm.report.gpus: unknown key"):
        experiment_from_dict(experiment_dict("demo", "/r", report={"gpus": 1}))


def test_plain_command_without_accelerate_config():
    exp = experiment_from_dict(experiment_dict("demo", "/r", time="1:00:00", signal_seconds=60))
    text = slurm.render_cell_array(exp, RunLayout(Path("/r/demo")), [0, 1])
    assert "bash -c 'trap \"\" USR1; exec d2lora sweep cell -c /r/demo/experiment.yaml " \
           "--index $SLURM_ARRAY_TASK_ID' &" in text
    assert "--gpus-per-node" not in text and "(no slurm.setup lines)" in text
    fixed = experiment_dict("demo", "/r", nodes=1)
    fixed["launch"] = {"accelerate_config": "a.yaml", "main_process_port": 29512}
    assert "\nMAIN_PROCESS_PORT=29512\n" in slurm.render_warmup(experiment_from_dict(fixed), RUN)


def _step(text: str) -> str:
    """The command the script's srun step gives `bash -c`."""
    import shlex

    line = next(line for line in text.splitlines() if line.lstrip().startswith("bash -c "))
    return shlex.split(line.strip().removeprefix("bash -c ").removesuffix(" &"))[0]


def test_a_plain_cell_on_several_gpus_sees_only_the_first():
    data = experiment_dict("demo", "/r", time="1:00:00", signal_seconds=60, gpus_per_node=4, whole_node=True)
    text = slurm.render_cell_array(experiment_from_dict(data), RunLayout(Path("/r/demo")), [0],
                                   command="printenv CUDA_VISIBLE_DEVICES")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5,6,7"}  # what Slurm gives a task of a whole node
    done = subprocess.run(["bash", "-c", _step(text)], env=env, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "3", done.stderr
    unset = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # devices fenced by cgroups only
    done = subprocess.run(["bash", "-c", _step(text)], env=unset, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "0", done.stderr
    cpu = slurm.render_cell_array(experiment_from_dict({**data, "slurm": {"time": "1:00:00"}}),
                                  RunLayout(Path("/r/demo")), [0], command="printenv CUDA_VISIBLE_DEVICES")
    assert "CUDA_VISIBLE_DEVICES=" not in _step(cpu)  # no GPUs asked for: nothing to pin


def test_multi_node_without_launcher_is_refused():
    data = experiment_dict("demo", "/r", nodes=2)
    data["model"]["name_or_path"] = "someone/unknown-model"  # no shape: no strategy, the plain command
    with pytest.raises(ValueError, match="slurm.nodes: 2 nodes need launch.accelerate_config"):
        slurm.render_warmup(experiment_from_dict(data), RUN)
    # a model the estimate can size gets auto's launcher: DDP over both nodes
    step = slurm.render_warmup(experiment_from_dict(experiment_dict("demo", "/r", nodes=2)), RUN)
    assert "accelerate launch --config_file" in step and "launch/accelerate/ddp.yaml" in step


def test_signal_must_come_before_the_time_limit():
    exp = experiment_from_dict(experiment_dict("demo", "/r", time="00:05:00", signal_seconds=300))
    with pytest.raises(ValueError, match="slurm.signal_seconds: 300 s is not shorter"):
        slurm.render_cell_array(exp, RUN, [0])


@pytest.mark.parametrize(("value", "seconds"), [("04:00:00", 14400), ("30", 1800), ("10:30", 630),
                                                ("1-00:00:00", 86400), ("2-12", 216000), ("unlimited", None)])
def test_slurm_time_formats(value, seconds):
    assert slurm._slurm_seconds(value) == seconds


def test_array_spec():
    assert slurm.array_spec([3, 7], 8) == "3,7%8"
    assert slurm.array_spec([5, 0, 1, 2, 2, 9, 10], 2) == "0-2,5,9-10%2"
    with pytest.raises(ValueError, match="no array indices"):
        slurm.array_spec([], 2)


def test_submission_plan_dependencies_and_skips(tmp_path):
    exp = experiment_from_dict(experiment_dict("demo", str(tmp_path)))
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    steps, skipped = slurm.plan_submission(exp, layout, cells, range(4))
    assert [(s.name, s.after) for s in steps] == [("warmup", None), ("array", ("afterok", ("warmup",))),
                                                 ("report", ("afterany", ("array",)))]
    jobs = {"warmup": "11", "array": "12"}
    assert [slurm.sbatch_argv(s, jobs)[2] for s in steps[1:]] == ["--dependency=afterok:11",
                                                                   "--dependency=afterany:12"]
    lora_only = [i for i, c in enumerate(cells) if c.init == "lora"]
    steps, skipped = slurm.plan_submission(exp, layout, cells, lora_only)
    assert [s.name for s in steps] == ["array", "report"] and steps[0].after is None
    assert skipped == {"warmup": "no submitted cell uses init d2lora"}
    layout.warmup_dir.mkdir(parents=True)
    layout.warmup_result.write_text("{}")
    steps, skipped = slurm.plan_submission(exp, layout, cells, range(4))
    assert [s.name for s in steps] == ["array", "report"] and "done" in skipped["warmup"]


def test_each_warmup_run_is_a_job_and_each_array_waits_for_its_own_warmup_only(tmp_path):
    data = experiment_dict("axes", str(tmp_path))
    warmup = data.pop("warmup")
    data["warmups"] = {"m8": {**warmup, "n": 8}, "m32": {**warmup, "n": 32}}
    data["grid"][0] |= {"lora_inits": ["default", "pissa"], "seeds": [0]}
    exp = experiment_from_dict(data)
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    steps, skipped = slurm.plan_submission(exp, layout, cells, range(len(cells)))
    warmups = ["m32", "m32+pissa", "m8", "m8+pissa"]
    assert [s.name for s in steps] == [*(f"warmup:{k}" for k in warmups), "array:vanilla",
                                       *(f"array:{k}" for k in warmups), "report"]
    after = {s.name: s.after for s in steps}
    assert after["array:vanilla"] is None
    assert all(after[f"array:{k}"] == ("afterok", (f"warmup:{k}",)) for k in warmups)
    assert after["report"] == ("afterany", ("array:vanilla", *(f"array:{k}" for k in warmups)))
    by_name = {s.name: s for s in steps}
    assert {cells[i].id for i in by_name["array:m8+pissa"].indices} == {"math-sft-d2lora@m8+pissa-n8-s0"}
    assert {cells[i].id for i in by_name["array:vanilla"].indices} == {"math-sft-lora-n8-s0",
                                                                       "math-sft-lora+pissa-n8-s0"}
    assert "d2lora warmup -c" in by_name["warmup:m8+pissa"].text and "--warmup m8+pissa" in by_name[
        "warmup:m8+pissa"].text
    assert "--job-name=d2lora-axes-warmup-m8+pissa" in by_name["warmup:m8+pissa"].text
    throttle = f"%{exp.slurm.max_parallel}"  # each waits for its own warm-up: none shares its throttle
    assert all(any(x.startswith("#SBATCH --array=") and x.endswith(throttle) for x in sbatch_lines(s.text))
               for s in steps if s.name.startswith("array:"))
    jobs = {"array:vanilla": "5", **{f"array:{k}": str(10 + i) for i, k in enumerate(warmups)}}
    assert slurm.sbatch_argv(by_name["report"], jobs)[2] == "--dependency=afterany:5:10:11:12:13"
    layout.warmup_home("m8").mkdir(parents=True)
    layout.warmup_result_of("m8").write_text("{}")  # done: its cells wait for nothing
    steps, skipped = slurm.plan_submission(exp, layout, cells, range(len(cells)))
    assert "warmup:m8" not in {s.name for s in steps} and "done" in skipped["warmup:m8"]
    assert {s.name: s.after for s in steps}["array:m8"] is None


def test_only_failed_lists_cells_without_result(tmp_path):
    exp = experiment_from_dict(experiment_dict("demo", str(tmp_path)))
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    for i in (0, 2):
        layout.cell_dir(cells[i].id).mkdir(parents=True)
        layout.cell_result(cells[i].id).write_text("{}")
    layout.cell_checkpoints(cells[1].id).mkdir(parents=True)  # started is not done
    assert slurm.unfinished_indices(layout, cells) == [1, 3]


def test_dry_run_prints_scripts_and_commands_and_writes_nothing(tmp_path, capsys):
    exp = experiment_from_dict(experiment_dict("demo", str(tmp_path)))
    layout = RunLayout(exp.run_dir)
    result = slurm.submit(exp, layout, dry_run=True)
    out = capsys.readouterr().out
    assert not layout.root.exists()
    assert result.jobs == {} and result.indices == [0, 1, 2, 3]
    assert f"sbatch --parsable {layout.slurm_dir}/warmup.sbatch" in out
    assert f"sbatch --parsable '--dependency=afterok:<warmup-job-id>' {layout.slurm_dir}/cell_array.sbatch" in out
    assert f"sbatch --parsable '--dependency=afterany:<array-job-id>' {layout.slurm_dir}/report.sbatch" in out
    assert "#SBATCH --array=0-3%8" in out and out.count("#!/bin/bash") == 3


def test_rendered_scripts_are_valid_bash(tmp_path):
    exp = paper_two_nodes()
    for name, text in (("w", slurm.render_warmup(exp, RUN)), ("a", slurm.render_cell_array(exp, RUN, [0])),
                       ("r", slurm.render_report(exp, RUN))):
        (tmp_path / name).write_text(text)
        proc = subprocess.run(["bash", "-n", str(tmp_path / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


# ---- right-sized requests from the memory estimate (launch.strategy) ----------------------------
def paper_auto(**slurm_settings: object):
    """The paper's 8B model under `strategy: auto` on 8-GPU nodes (960G, 64 CPUs each)."""
    data = experiment_dict("paper_math", "/shared/runs", partition="gpu", gpus_per_node=8, cpus_per_task=64,
                           mem="960G", **slurm_settings)
    data["model"].update(dtype="bfloat16", gradient_checkpointing=True)
    data["launch"] = {"strategy": "auto", "num_processes": 8}
    return experiment_from_dict(data)


def test_a_cell_that_fits_one_gpu_asks_for_one_and_a_share_of_the_node():
    text = slurm.render_cell_array(paper_auto(), RUN, [0, 1, 2, 3])
    lines = sbatch_lines(text)
    assert "#SBATCH --gpus-per-node=1" in lines and "#SBATCH --nodes=1" in lines
    assert "#SBATCH --cpus-per-task=8" in lines and "#SBATCH --mem=120G" in lines  # 1/8 of the node
    assert "#SBATCH --exclusive" not in lines
    assert "# launch: ddp on 1 GPU(s)" in text  # why, in the script
    step = next(x for x in text.splitlines() if x.startswith("  bash -c "))
    assert "accelerate launch" not in step and "d2lora sweep cell" in step  # one GPU: one plain process
    assert "srun --nodes=1 --ntasks=1 --cpus-per-task=8 \\" in text


def test_whole_node_asks_for_the_node_and_runs_every_rank():
    text = slurm.render_cell_array(paper_auto(whole_node=True), RUN, [0, 1, 2, 3])
    lines = sbatch_lines(text)
    assert {"#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --mem=960G",
            "#SBATCH --exclusive"} <= set(lines)
    step = next(x for x in text.splitlines() if x.startswith("  bash -c "))
    assert "--config_file" in step and "launch/accelerate/ddp.yaml" in step and "--num_processes 8" in step


def test_a_sharded_strategy_asks_for_the_gpus_it_needs_and_launches_its_json():
    data = experiment_dict("paper_math", "/shared/runs", gpus_per_node=8, cpus_per_task=64, mem="960G")
    data["model"].update(dtype="bfloat16", gradient_checkpointing=True)
    data["launch"] = {"strategy": "zero3", "num_processes": 8, "gpu_memory_gib": 20}  # 8B bf16 eval fits, training not
    data["methods"]["sft"].update(max_length=2048, per_device_batch_size=2)
    text = slurm.render_cell_array(experiment_from_dict(data), RUN, [0])
    gpus = next(int(x.split("=")[1]) for x in sbatch_lines(text) if x.startswith("#SBATCH --gpus-per-node="))
    assert 1 < gpus < 8
    step = next(x for x in text.splitlines() if x.startswith("  bash -c "))
    assert f"--num_processes {gpus}" in step and "--deepspeed_config_file" in step and "zero3_bf16.json" in step


def test_a_whole_node_memory_request_cannot_be_shared():
    exp = paper_auto()
    exp.slurm.mem = "0"  # all of a node's memory
    with pytest.raises(InputError, match=r"slurm.mem: '0' cannot be split .* slurm.whole_node: true"):
        slurm.render_cell_array(exp, RUN, [0])
    exp.slurm.whole_node = True
    assert "#SBATCH --mem=0" in sbatch_lines(slurm.render_cell_array(exp, RUN, [0]))


def mixed_launches(tmp_path):
    """On 32 GiB GPUs the 8B model's SFT cells fit one GPU and its DPO cells need ZeRO-3 on two."""
    data = experiment_dict("mixed", str(tmp_path), partition="gpu", gpus_per_node=8, cpus_per_task=64, mem="960G")
    data["model"].update(dtype="bfloat16", gradient_checkpointing=True)
    data["launch"] = {"strategy": "auto", "num_processes": 8, "gpu_memory_gib": 32}
    data["methods"]["dpo"] = {**data["methods"]["sft"], "beta": 0.1}
    for method in ("sft", "dpo"):
        data["methods"][method].update(max_length=2048, per_device_batch_size=2)
    data["grid"][0] |= {"methods": ["sft", "dpo"], "n": [0, 8]}
    exp = experiment_from_dict(data)
    layout = RunLayout(exp.run_dir)
    return exp, layout, freeze_plan(exp, layout)


def test_methods_with_different_launches_get_one_array_each_asking_for_their_own_gpus(tmp_path):
    """Two arrays, each sized for its own method, both after the one warm-up, sharing slurm.max_parallel;
    the report waits for both."""
    exp, layout, cells = mixed_launches(tmp_path)
    steps, _ = slurm.plan_submission(exp, layout, cells, range(len(cells)))
    assert [s.name for s in steps] == ["warmup", "array:ddp-x1", "array:zero3-x2", "report"]
    by_name = {s.name: s for s in steps}
    assert {cells[i].method for i in by_name["array:zero3-x2"].indices} == {"dpo"}
    assert {cells[i].method for i in by_name["array:ddp-x1"].indices} == {"sft", "none"}  # n = 0: evaluation
    assert sorted(i for s in steps for i in s.indices) == list(range(len(cells)))  # every cell in one array
    one, two = sbatch_lines(by_name["array:ddp-x1"].text), sbatch_lines(by_name["array:zero3-x2"].text)
    assert "#SBATCH --gpus-per-node=1" in one and "#SBATCH --gpus-per-node=2" in two
    assert any(x.endswith("%4") for x in one if "--array=" in x)  # 8 cells at once, shared by the two arrays
    assert any(x.endswith("%4") for x in two if "--array=" in x)
    assert "--job-name=d2lora-mixed-cells-zero3-x2" in by_name["array:zero3-x2"].text
    assert by_name["array:ddp-x1"].after == by_name["array:zero3-x2"].after == ("afterok", ("warmup",))
    assert by_name["report"].after == ("afterany", ("array:ddp-x1", "array:zero3-x2"))
    sft_only = [i for i, c in enumerate(cells) if c.method != "dpo"]  # one launch: the one array as before
    assert [s.name for s in slurm.plan_submission(exp, layout, cells, sft_only)[0]] == ["warmup", "array", "report"]
    assert slurm.share_throttle(8, [3, 3, 3]) == [3, 3, 2] and slurm.share_throttle(2, [5, 5, 5]) == [1, 1, 1]
    assert slurm.share_throttle(8, [2, 40]) == [2, 6]  # no array is given more than its cells


def test_a_split_submission_is_recorded_so_that_status_finds_each_cells_own_array(tmp_path):
    from d2lora_dist.sweep.status import cell_status

    exp, layout, cells = mixed_launches(tmp_path)
    steps, skipped = slurm.plan_submission(exp, layout, cells, range(len(cells)))
    jobs = {"warmup": "10", "array:ddp-x1": "11", "array:zero3-x2": "12", "report": "13"}
    layout.slurm_dir.mkdir(parents=True, exist_ok=True)
    slurm._append_record(layout, slurm.SubmitResult(steps, list(range(len(cells))), [], jobs, skipped), False)
    rows = cell_status(exp, layout, lambda job_id: None)  # Slurm has forgotten them: each row names its job
    assert [r.job for r in rows] == [f"{12 if c.method == 'dpo' else 11}_{i}" for i, c in enumerate(cells)]
    assert {r.state for r in rows} == {"unknown"}


FAKE_SBATCH = """#!/bin/sh
# sbatch as a cluster that refuses the cell array (what an unknown partition on that job looks like)
case "$*" in *cell_array*) echo "sbatch: error: invalid partition name specified" >&2; exit 1;; esac
n=$(cat "$0.count" 2>/dev/null || echo 100); n=$((n + 1)); echo "$n" > "$0.count"; echo "$n"
"""


def test_a_refused_sbatch_names_the_job_its_error_and_what_was_already_submitted(
        tiny_experiment: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import json

    from d2lora_dist.cli import main
    from tests.conftest import write_experiment

    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "sbatch").write_text(FAKE_SBATCH)
    (tools / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    layout = RunLayout(tmp_path / "runs" / "tiny")
    assert main(["sweep", "submit", "-c", str(path)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("d2lora: error: sweep submit: the cell array job was not submitted: `sbatch --parsable "
                          f"--dependency=afterok:101 {layout.slurm_dir}/cell_array.sbatch` exited 1: sbatch: error: "
                          "invalid partition name specified; already submitted: warmup 101 (recorded in "
                          f"{layout.slurm_dir}/jobs.json; `scancel 101` cancels them")
    records = json.loads((layout.slurm_dir / "jobs.json").read_text())
    assert len(records) == 1 and records[0]["jobs"] == {"warmup": "101", "array": None, "report": None}
    assert records[0]["failed"]["step"] == "array" and len(records[0]["commands"]) == 2
    written = (layout.slurm_dir / "jobs.json").read_bytes()

    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # no sbatch at all
    assert main(["sweep", "submit", "-c", str(path)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert err == ("d2lora: error: sweep submit: the warm-up job was not submitted: `sbatch` not found on PATH: "
                   "sweep submit runs on a Slurm login node (`sweep run` runs the sweep on this machine); nothing "
                   "was submitted")
    assert (layout.slurm_dir / "jobs.json").read_bytes() == written  # the earlier record is kept as it was


def _error_line(stderr: str) -> str:
    """The one error line (the data loader's progress bars share stderr), and no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("d2lora: error:")]
    assert len(errors) == 1, stderr
    return errors[0]
