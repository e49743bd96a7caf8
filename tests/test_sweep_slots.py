"""Slots: how many cells the local executor runs at once, on what, and that it changes no result.

The slot plan is a pure function of the machine (cores, visible GPUs, free memory), the cells and
their launch; `sweep run --slots 2` on the tiny model gives every cell (and the warm-up, trained in a
slot beside the vanilla cells) the bit-identical adapter and the same predictions as `--slots 1`, each
cell runs once, a cell worker killed mid-cell fails only that cell, and one that exits between cells
is replaced without failing the next.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from d2lora_dist.config import experiment_from_dict, load_experiment
from d2lora_dist.errors import InputError
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.grid import Cell, WarmupRun
from d2lora_dist.sweep.local import slot_plan, warmups_in_slots
from d2lora_dist.sweep.pool import JobQueue, expected_work_first, run_on_slots
from d2lora_dist.sweep.slots import Machine, plan_slots
from tests.conftest import write_experiment
from tests.test_cli import REPO, _cli

GRID = [{"task": "math", "methods": ["sft", "dpo"], "inits": ["lora", "d2lora"], "n": [0, 4], "seeds": [0, 1]}]


def test_two_cpu_cores_give_two_one_thread_slots_unless_memory_or_cells_say_fewer() -> None:
    two = plan_slots(None, Machine(2, (), 20.0), cells=10, ranks_per_cell=1, cell_gib=2.0)
    assert [(s.index, s.threads, s.devices) for s in two.slots] == [(0, 1, None), (1, 1, None)]
    assert two.slots[1].env() == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "D2LORA_SLOT": "1/2"}
    assert len(plan_slots(None, Machine(2, (), 3.0), 10, 1, 2.0).slots) == 1  # 2 x 2 GiB > 90% of 3 GiB
    assert len(plan_slots(None, Machine(16, (), 100.0), 3, 1, 2.0).slots) == 3  # no more slots than cells
    assert plan_slots(None, Machine(16, (), 100.0), 3, 1, 2.0).slots[0].threads == 5
    assert plan_slots(8, Machine(16, (), 100.0), 3, 1, 2.0).slots[0].threads == 5  # 3 cells: 3 slots
    ranks = plan_slots(None, Machine(4, (), 100.0), 8, 2, 1.0)  # two-rank cells: 2 cores each, 1 thread per rank
    assert [s.threads for s in ranks.slots] == [1, 1]
    assert len(plan_slots(None, Machine(8, (), 10.0), 8, 2, 4.0).slots) == 1  # 2 ranks x 4 GiB: one cell fits
    one = plan_slots(1, Machine(2, (), 20.0), 10, 1, 2.0)
    assert [(s.threads, s.devices) for s in one.slots] == [(2, None)]


def test_without_a_memory_estimate_auto_is_one_slot_and_threads_the_user_set_are_kept() -> None:
    unknown = plan_slots(None, Machine(16, (), 100.0), 10, 1, None)
    assert len(unknown.slots) == 1 and "no memory estimate" in unknown.reason
    assert len(plan_slots(4, Machine(16, (), 100.0), 10, 1, None).slots) == 4  # asked for: the user's call
    kept = plan_slots(None, Machine(2, (), 20.0, threads_set=True), 10, 1, 1.0)
    assert len(kept.slots) == 2 and "OMP_NUM_THREADS" not in kept.slots[0].env()
    assert "threads you set" in kept.reason


def test_gpu_slots_are_groups_of_the_gpus_the_largest_cell_needs_and_a_launch_sees_only_its_own() -> None:
    eight = plan_slots(None, Machine(64, tuple("01234567"), 500.0), 20, 1, 30.0)
    assert eight.packed and [s.devices for s in eight.slots] == [(str(i),) for i in range(8)]
    assert eight.slots[3].env()["CUDA_VISIBLE_DEVICES"] == "3" and eight.slots[3].threads == 8
    pairs = plan_slots(None, Machine(8, ("3", "5", "6", "7"), 500.0), 20, 2, 30.0)
    assert [s.devices for s in pairs.slots] == [("3", "5"), ("6", "7")] and pairs.slots[0].threads == 2
    # a one-GPU cell in a two-GPU slot sees one GPU: a plain process that saw two would use DataParallel
    assert pairs.slots[1].env(ranks=1)["CUDA_VISIBLE_DEVICES"] == "6"
    assert pairs.slots[1].env(ranks=2)["CUDA_VISIBLE_DEVICES"] == "6,7"
    whole = plan_slots(None, Machine(8, ("0", "1"), 500.0), 20, 2, 30.0)  # one slot: cells take every rank
    assert not whole.packed and [s.devices for s in whole.slots] == [("0", "1")] and whole.slots[0].threads == 4
    assert whole.slots[0].env(ranks=1)["CUDA_VISIBLE_DEVICES"] == "0"
    configured = plan_slots(None, Machine(8, tuple("0123"), 500.0), 20, 1, None)  # no estimate: one slot
    assert len(configured.slots) == 1 and not configured.packed
    with pytest.raises(InputError, match="--slots 2: cells launch as configured.*set launch.strategy"):
        plan_slots(2, Machine(8, tuple("0123"), 500.0), 20, 1, None)


def test_more_slots_than_the_machine_holds_are_refused_naming_why() -> None:
    with pytest.raises(InputError, match=r"--slots 3: .*2 CPU core.*at most 2 slot"):
        plan_slots(3, Machine(2, (), 20.0), 10, 1, 1.0)
    with pytest.raises(InputError, match=r"--slots 2: .*memory holds at most 1 slot"):
        plan_slots(2, Machine(2, (), 3.0), 10, 1, 2.0)
    with pytest.raises(InputError, match=r"--slots 3: 4 visible GPU\(s\) hold at most 2 slot"):
        plan_slots(3, Machine(8, tuple("0123"), 500.0), 10, 2, 30.0)
    with pytest.raises(InputError, match="--slots: 0 is not a number of slots"):
        plan_slots(0, Machine(2, (), 20.0), 10, 1, 1.0)
    bad = _cli("sweep", "run", "-c", "x.yaml", "--slots", "many")
    assert bad.returncode == 2 and "'many' is neither a number of slots nor auto" in bad.stderr
    none = _cli("sweep", "run", "-c", "x.yaml", "--slots", "0")
    assert none.returncode == 2 and "'0': a number of slots is 1 or more" in none.stderr


def test_slots_for_no_cell_left_are_one_slot_not_a_division_by_zero() -> None:
    for machine in (Machine(2, (), 20.0), Machine(8, tuple("0123"), 500.0)):
        for requested in (1, 2, None):
            plan = plan_slots(requested, machine, 0, 1, 1.0)
            assert len(plan.slots) == 1 and (plan.slots[0].threads or 1) >= 1


def test_cells_with_the_most_training_go_first_and_evaluation_only_cells_last() -> None:
    cells = [Cell("math", "none", "lora", 0, 0), Cell("math", "sft", "lora", 8, 0),
             Cell("math", "dpo", "lora", 4, 0), Cell("math", "sft", "d2lora", 16, 0)]
    assert [(c.method, c.n) for c in expected_work_first(cells)] == [("sft", 16), ("dpo", 4), ("sft", 8),
                                                                      ("none", 0)]


WARMUP = WarmupRun("warmup")


def test_the_warmup_comes_first_and_its_cells_wait_for_it_while_vanilla_cells_run() -> None:
    d2lora, lora = Cell("math", "sft", "d2lora", 8, 0), Cell("math", "sft", "lora", 4, 0)
    queue = JobQueue([WARMUP], [d2lora, lora], threading.Event())
    assert queue.take() == WARMUP
    assert queue.take() == lora  # the D2LoRA cell waits for its warm-up; a free slot takes what can run
    taken: list = []
    waiting = threading.Thread(target=lambda: taken.append(queue.take()))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive() and not taken  # only the warm-up's cell is left: the slot waits
    assert queue.warmup_ended(WARMUP, ok=True) == []
    waiting.join(timeout=5)
    assert taken == [d2lora] and queue.take() is None


def test_the_cells_of_a_failed_warmup_are_held_back_and_a_stop_ends_the_wait() -> None:
    d2lora, lora = Cell("math", "sft", "d2lora", 8, 0), Cell("math", "dpo", "d2lora", 8, 0)
    queue = JobQueue([WARMUP], [d2lora, lora], threading.Event())
    queue.take()
    assert queue.warmup_ended(WARMUP, ok=False) == [d2lora, lora]
    assert queue.take() is None and queue.held_back == [d2lora, lora]
    stop = threading.Event()
    stopped = JobQueue([WARMUP], [d2lora], stop)
    stopped.take()
    threading.Timer(0.3, stop.set).start()
    assert stopped.take() is None  # Ctrl-C while a slot waits for a warm-up


def test_a_warmup_runs_in_a_slot_only_when_its_launch_fits_one(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    cells = [Cell("math", "sft", "lora", 4, 0), Cell("math", "sft", "d2lora", 4, 0)]
    two = slot_plan(exp, cells, None, Machine(2, (), 20.0), warmups=[WARMUP])
    assert len(two.slots) == 2 and warmups_in_slots(exp, two, [WARMUP])
    assert not warmups_in_slots(exp, two, [])  # nothing to train
    one = slot_plan(exp, cells, 1, Machine(2, (), 20.0), warmups=[WARMUP])
    assert not warmups_in_slots(exp, one, [WARMUP])  # one slot: the warm-up first, on the whole machine
    paper = REPO / "launch/experiments/paper_math.yaml"
    box = Machine(64, tuple("01234567"), 500.0)
    cells = [Cell("math", "sft", "lora", n, seed) for n in (100, 200, 500, 1000) for seed in (0, 1)]
    every_rank = load_experiment(paper)  # cells fit one GPU each; the warm-up takes all 8 ranks: first, alone
    planned = slot_plan(every_rank, cells, None, box, warmups=[WARMUP])
    assert len(planned.slots) == 8 and not warmups_in_slots(every_rank, planned, [WARMUP])
    single = load_experiment(paper, ["launch.num_processes=1"])  # a one-GPU warm-up: in a slot
    planned = slot_plan(single, cells, None, box, warmups=[WARMUP])
    assert len(planned.slots) == 8 and warmups_in_slots(single, planned, [WARMUP])


# A cell worker that runs one cell (writing its result.json) and exits, as a worker killed between cells would.
ONE_CELL_WORKER = """
import json, os, pathlib, sys
report = os.fdopen(int(os.environ["D2LORA_WORKER_REPORT_FD"]), "w", buffering=1)
cell = sys.stdin.readline().strip()
report.write(cell + " started\\n")
result = pathlib.Path(sys.argv[1]) / "cells" / cell / "result.json"
result.parent.mkdir(parents=True, exist_ok=True)
result.write_text(json.dumps({"cell": cell}))
report.write(cell + " ok\\n")
"""


def test_a_worker_that_exits_between_cells_is_replaced_and_the_next_cell_runs(tiny_experiment: dict,
                                                                               capsys: pytest.CaptureFixture) -> None:
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    cells = [Cell("math", "sft", "lora", n, 0) for n in (4, 8, 16)]
    plan = plan_slots(1, Machine(2, (), 20.0), len(cells), 1, 1.0)
    held = run_on_slots(exp, layout, cells, plan, [], True, lambda *a: 1,
                        lambda launch: [sys.executable, "-c", ONE_CELL_WORKER, str(layout.root)])
    out = capsys.readouterr().out
    assert held == [] and all(layout.cell_result(c.id).is_file() for c in cells)  # none failed
    assert out.count("had exited (code 0) before") == 2 and "FAILED" not in out


def _results(run_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*/result.json"))}


def _predictions(run_dir: Path) -> dict[str, list[dict]]:
    return {f"{p.parent.parent.name}/{p.name}": [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "cells").glob("*/predictions/*.jsonl"))}


def _same_predictions(one: dict[str, list[dict]], two: dict[str, list[dict]]) -> None:
    """Equal rows, ARC log-likelihoods included: the same computation at the same thread count."""
    assert one.keys() == two.keys()
    for name, rows in one.items():
        assert rows == two[name], name


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two slots need two cores")
def test_two_slots_give_every_cell_the_same_adapter_and_predictions_as_one(tiny_experiment: dict,
                                                                            tmp_path: Path) -> None:
    tiny_experiment["lora"]["dropout"] = 0.1  # dropout masks too must not depend on the slot
    tiny_experiment["grid"] = GRID
    runs = {}
    # Bit for bit, so each cell must run the same computation in both: at the same thread count. Two slots
    # take half the cores each; the one slot is given as many (OMP_NUM_THREADS set: slots keep it), as a
    # thread count may split a sum (a reduction, a matmul's inner dimension) differently.
    half = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for slots, threads in (("1", {"OMP_NUM_THREADS": half, "MKL_NUM_THREADS": half}), ("2", {})):
        tiny_experiment["output_dir"] = str(tmp_path / f"slots{slots}")
        path = write_experiment(tiny_experiment, tmp_path / f"exp{slots}.yaml")
        with pytest.MonkeyPatch.context() as env:
            for key, value in threads.items():
                env.setenv(key, value)
            done = _cli("sweep", "run", "-c", str(path), "--slots", slots)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[slots] = (tmp_path / f"slots{slots}" / "tiny", done.stdout)
    (one, _), (two, out) = runs["1"], runs["2"]
    first, second = _results(one), _results(two)
    assert len(first) == 10 and first.keys() == second.keys()
    for cell, result in first.items():
        assert (result["adapter"] or {}).get("sha256") == (second[cell]["adapter"] or {}).get("sha256"), cell
        assert result["metrics"] == second[cell]["metrics"], cell
    _same_predictions(_predictions(one), _predictions(two))  # completions and scores: identical
    # the warm-up trained in slot 0 (one thread) while slot 1 ran vanilla cells, to the same adapter as alone
    warmups = [json.loads((run / "warmup" / "adapter" / "manifest.json").read_text())["adapter_sha256"]
               for run in (one, two)]
    assert warmups[0] == warmups[1]
    where = [json.loads((run / "warmup" / "result.json").read_text()) for run in (one, two)]
    assert [w["runtime"]["slot"] for w in where] == ["0/1", "0/2"] and all(w["timing"]["warmup_s"] > 0 for w in where)
    lines = out.splitlines()
    assert any(line.startswith("=== warm-up warmup on slot") for line in lines)
    ended = lines.index(next(line for line in lines if "warm-up warmup done in" in line))
    assert any(line.startswith("=== cell ") and "-lora-" in line for line in lines[:ended])  # the slots take it first
    assert {r["runtime"]["slot"] for r in first.values()} == {"0/1"}
    assert {r["runtime"]["slot"] for r in second.values()} == {"0/2", "1/2"}  # both slots ran cells
    assert {r["runtime"]["torch_threads"] for r in second.values()} == {int(half)}
    assert {r["runtime"]["torch_threads"] for r in first.values()} == {int(half)}
    # each cell ran once, and each slot's worker loaded the base once for all of its cells
    ended = [line for line in out.splitlines() if line.startswith("[slot ") and "] math-" in line]
    assert "[slots] 2 slot(s)" in out and out.count("=== cell ") == 10 and len(ended) == 10
    assert all(" done in " in line for line in ended)
    logs = sorted((two / "logs").glob("slot*.log"))
    assert [p.name for p in logs] == ["slot0.log", "slot1.log"]
    loaded = [line for p in logs for line in p.read_text().splitlines() if line.startswith("[worker]")]
    assert len(loaded) == 10 and all("base model loaded 1 time(s)" in line for line in loaded)


def test_a_worker_killed_mid_cell_fails_that_cell_and_a_new_worker_runs_the_rest(tiny_experiment: dict,
                                                                                 tmp_path: Path) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora"], "n": [4, 8],
                                "seeds": [0, 1]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    env = dict(os.environ, D2LORA_TEST_STEP_DELAY_S="1.5")
    log = (tmp_path / "sweep.log").open("w")
    sweep = subprocess.Popen([sys.executable, "-m", "d2lora_dist.cli", "sweep", "run", "-c", str(path), "--slots",
                              "1"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline:  # the worker's first cell is training
        frozen = tmp_path / "runs" / "tiny" / "experiment.yaml"  # what the executor hands its launches
        found = subprocess.run(["pgrep", "-f", f"{frozen} --cells-from-stdin"], capture_output=True,
                               text=True).stdout.split()
        if found and any((tmp_path / "runs" / "tiny" / "cells").glob("*/subset.json")):
            victim = int(found[0])
        time.sleep(0.2)
    assert victim is not None, "the cell worker never started training"
    os.kill(victim, signal.SIGKILL)
    sweep.wait(timeout=600)
    out = (tmp_path / "sweep.log").read_text()
    assert sweep.returncode == 1, out[-3000:]
    assert "exited with code -9" in out and out.count(" FAILED in ") == 1
    results = _results(tmp_path / "runs" / "tiny")
    assert len(results) == 3  # the other three cells ran, in a worker started for them
    assert out.count("--cells-from-stdin") == 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two slots need two cores")
def test_ctrl_c_stops_every_slot_and_leaves_no_process_behind(tiny_experiment: dict, tmp_path: Path) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora"], "n": [8, 16], "seeds": [0, 1]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    frozen = tmp_path / "runs" / "tiny" / "experiment.yaml"
    env = dict(os.environ, D2LORA_TEST_STEP_DELAY_S="5")
    cells = tmp_path / "runs" / "tiny" / "cells"
    with (tmp_path / "sweep.log").open("w") as log:
        # SIGINT as a terminal leaves it: an ignored SIGINT (some library may set that in this test process)
        # would stay ignored across exec, and the sweep would never see the Ctrl-C
        sweep = subprocess.Popen([sys.executable, "-m", "d2lora_dist.cli", "sweep", "run", "-c", str(path),
                                  "--slots", "2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 300

        def workers() -> list[str]:
            return subprocess.run(["pgrep", "-f", f"{frozen} --cells-from-stdin"], capture_output=True,
                                  text=True).stdout.split()

        def training() -> bool:  # both slots' workers are in a cell that has drawn its rows
            return len(workers()) == 2 and len(list(cells.glob("*/subset.json"))) >= 2

        while not training() and time.time() < deadline:
            time.sleep(0.2)
        assert training() and sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        assert not list(cells.glob("*/result.json"))  # the signal comes while both are mid-cell
        sweep.send_signal(signal.SIGINT)  # to the sweep alone, as `kill -INT` would, not its process group
        sweep.wait(timeout=120)
    assert sweep.returncode != 0, (tmp_path / "sweep.log").read_text()[-3000:]
    time.sleep(1)
    assert workers() == []  # no slot's worker outlives the sweep
    assert not list(cells.glob("*/result.json"))  # none ran to its end


def test_two_launches_are_never_handed_the_same_free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS may offer a just-released port again; two slots starting `accelerate launch` at once must not
    both get it (the second launch's rendezvous would fail or join the first's)."""
    import socket

    from d2lora_dist.sweep import local

    offered = iter([29517, 29517, 29517, 29530])

    class Offering(socket.socket):
        def getsockname(self):  # what the OS offers, in order: the same port three times
            return ("127.0.0.1", next(offered))

    monkeypatch.setattr(local.socket, "socket", Offering)
    monkeypatch.setattr(local, "_HANDED_OUT", set())
    assert [local.free_port(), local.free_port()] == [29517, 29530]
