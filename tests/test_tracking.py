"""W&B tracking, offline: modes, ids, artifacts, and a real TRL run read back from wandb's own files.

The offline run files are read with wandb's own reader of its transaction log
(`wandb leet inspect --json`, wandb >= 0.31), never by parsing them ourselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from d2lora_dist import tracking
from d2lora_dist.config import TrackingConfig, experiment_from_dict
from d2lora_dist.layout import RunLayout

FIXTURE = Path(__file__).parent / "fixtures" / "report" / "experiment.yaml"
FAKE_KEY = "local-" + "5f3c9a0e1b7d2468ace013579bdf2468ace01357"
WARMUP_SHA = "ab" * 32
CELL_SHA = "cd" * 32


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with a fake key; every wandb directory inside tmp_path."""
    for var in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "RANK", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "NETRC": str(tmp_path / "no-netrc"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb-art"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLE_GIT": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def experiment(tmp_path: Path, **overrides):
    data = yaml.safe_load(FIXTURE.read_text())
    data["output_dir"] = str(tmp_path / "runs")
    data.update(overrides)
    return experiment_from_dict(data, str(FIXTURE))


# ---- modes, names, scrubbing ----------------------------------------------------------

def test_resolve_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    auto = TrackingConfig(mode="auto")
    assert tracking.resolve_mode(auto) == "offline"  # no credentials
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert tracking.resolve_mode(auto) == "online"
    netrc.write_text(f"machine example.org login user password {FAKE_KEY}\n")
    assert tracking.resolve_mode(auto) == "offline"  # an entry for another host
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking.resolve_mode(auto) == "online"
    assert tracking.resolve_mode(TrackingConfig(mode="disabled")) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins over config and credentials
    assert tracking.resolve_mode(TrackingConfig(mode="online")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.resolve_mode(auto) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode(auto) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        tracking.resolve_mode(auto)


def test_ids_and_artifact_names_are_stable_and_valid():
    rid = tracking.run_id("paper math/v2", "math-dpo-d2lora-n1000-s0")
    assert rid == tracking.run_id("paper math/v2", "math-dpo-d2lora-n1000-s0")
    assert rid != tracking.run_id("paper math/v2", "math-dpo-lora-n1000-s0")
    assert len(rid) <= 64 and set(rid) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    long = tracking.run_id("x" * 200, "warmup")
    assert len(long) <= 64 and long != tracking.run_id("x" * 199, "warmup")
    assert tracking.artifact_name("paper math/v2", "warmup") == "paper-math-v2-warmup"
    assert tracking.artifact_name("demo_cpu", "math-sft-lora-n0-s0") == "demo_cpu-math-sft-lora-n0-s0"
    with pytest.raises(ValueError, match="not valid"):
        tracking.log_adapter_artifact(object(), Path("."), "bad name:v1", {"adapter_sha256": WARMUP_SHA})


def test_scrub_redacts_secret_keys_and_the_key_value(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    data = {"hub_token": "hf_abc", "api_key": "x", "max_new_tokens": 256, "nested": {"password": "p"},
            "setup": [f"export WANDB_API_KEY={FAKE_KEY}"], "empty_token": None}
    assert tracking.scrub(data) == {"hub_token": "<redacted>", "api_key": "<redacted>", "max_new_tokens": 256,
                                    "nested": {"password": "<redacted>"},
                                    "setup": ["export WANDB_API_KEY=<redacted>"], "empty_token": None}


def test_no_run_off_main_process_or_when_disabled(wandb_env, monkeypatch):
    exp = experiment(wandb_env)
    layout = RunLayout(exp.run_dir)
    monkeypatch.setenv("RANK", "1")
    assert tracking.start_run(exp, layout, "adapt", "c", {}, []) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.start_run(exp, layout, "adapt", "c", {}, []) is None
    assert not layout.wandb_dir.exists()
    # every helper takes "no run" quietly
    assert tracking.log_adapter_artifact(None, layout.root, "a", {}) is None
    assert tracking.use_adapter_artifact(None, "a") is None
    tracking.finish_run(None, {"gsm8k": {"accuracy": 0.5}})


def test_throughput_callback_needs_token_counting_and_measures_intervals():
    cb = tracking.ThroughputCallback()
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        cb.on_train_begin(SimpleNamespace(include_num_input_tokens_seen="no"), state, None)
    cb.on_train_begin(SimpleNamespace(include_num_input_tokens_seen="non_padding"), state, None)
    state.global_step, state.num_input_tokens_seen = 4, 4000
    logs = {"loss": 1.0}
    cb.on_log(None, state, None, logs=logs)
    assert logs["tokens_per_s"] > 0 and logs["step_time_s"] > 0
    assert logs["tokens_per_s"] * logs["step_time_s"] * 4 == pytest.approx(4000)
    end = {"train_runtime": 1.0}
    cb.on_log(None, state, None, logs=end)  # same step: an end-of-training or eval log
    assert "tokens_per_s" not in end


# ---- a real offline run, read back ----------------------------------------------------

def read_run(run_dir: Path) -> list[dict]:
    """Records of an offline run, through wandb's own transaction-log reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def records(recs: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in recs if r["type"] == kind]


def offline_runs(layout: RunLayout, name: str, exp_name: str) -> list[Path]:
    return sorted(layout.wandb_dir.glob(f"offline-run-*-{tracking.run_id(exp_name, name)}"))


def fake_adapter(path: Path, sha: str) -> dict:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 256)
    manifest = {"adapter_sha256": sha, "base_model": "tiny-llama"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def train_tiny_sft(output_dir: Path, run_name: str):
    from datasets import Dataset
    from peft import LoraConfig
    from tracking_fixtures import sft_rows, tiny_llama, tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    args = SFTConfig(output_dir=str(output_dir), run_name=run_name, report_to=["wandb"],
                     include_num_input_tokens_seen="non_padding", max_steps=3, logging_steps=1,
                     per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no", bf16=False,
                     use_cpu=True, max_length=64, disable_tqdm=True, activation_checkpointing=False)
    trainer = SFTTrainer(model=tiny_llama(tok), args=args, train_dataset=Dataset.from_list(sft_rows()),
                         processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    tracking.add_throughput_callback(trainer)
    trainer.train()
    return trainer


def test_offline_warmup_and_cell_runs_with_trl(wandb_env, capfd):
    import wandb

    secret_setup = [f"export WANDB_API_KEY={FAKE_KEY}"]  # a user's setup line must not leak the key either
    exp = experiment(wandb_env, slurm={"setup": secret_setup})
    layout = RunLayout(exp.run_dir)
    warm_name = tracking.artifact_name(exp.name, "warmup")
    cell = "math-sft-d2lora-n100-s0"

    run = tracking.start_run(exp, layout, "warmup", "warmup", {"n": 64}, ["warmup"])
    manifest = fake_adapter(layout.warmup_adapter, WARMUP_SHA)
    tracking.log_adapter_artifact(run, layout.warmup_adapter, warm_name, manifest)
    tracking.finish_run(run, {"train": {"final_loss": 0.5}})

    params = {"task": "math", "method": "sft", "init": "d2lora", "n": 100, "seed": 0}
    run = tracking.start_run(exp, layout, "adapt", cell, params, ["adapt", "d2lora"])
    assert wandb.run is run  # the trainer's WandbCallback will reuse it
    ref = tracking.use_adapter_artifact(run, warm_name, sha256=WARMUP_SHA)
    assert ref == f"{warm_name}:sha256-{WARMUP_SHA[:16]}"
    trainer = train_tiny_sft(layout.cell_checkpoints(cell), cell)
    trainer.model.save_pretrained(layout.cell_adapter(cell))
    tracking.log_adapter_artifact(run, layout.cell_adapter(cell), tracking.artifact_name(exp.name, cell),
                                  {"adapter_sha256": CELL_SHA, "parent_sha256": WARMUP_SHA})
    tracking.finish_run(run, {"gsm8k": {"accuracy": 0.25, "items": 50}, "arc_easy": {"accuracy": 0.6}})

    # offline runs live inside the run directory
    (warm_dir,) = offline_runs(layout, "warmup", exp.name)
    (cell_dir,) = offline_runs(layout, cell, exp.name)

    warm = read_run(warm_dir)
    (warm_run,) = records(warm, "run")
    assert (warm_run["job_type"], warm_run["run_group"], warm_run["display_name"]) == ("warmup", exp.name, "warmup")
    assert warm_run["run_id"] == tracking.run_id(exp.name, "warmup") and warm_run["tags"] == ["warmup"]
    (warm_art,) = records(warm, "artifact")
    assert (warm_art["name"], warm_art["type"]) == (warm_name, "lora-adapter")
    assert f"sha256-{WARMUP_SHA[:16]}" in warm_art["aliases"]
    assert json.loads(warm_art["metadata"])["adapter_sha256"] == WARMUP_SHA
    assert {f["path"] for f in warm_art["manifest"]["contents"]} == {"adapter_model.safetensors", "manifest.json"}

    recs = read_run(cell_dir)
    (cell_run,) = records(recs, "run")
    assert (cell_run["job_type"], cell_run["run_group"], cell_run["display_name"]) == ("adapt", exp.name, cell)
    assert cell_run["project"] == "d2lora" and cell_run["tags"] == ["adapt", "d2lora"]
    config = dict(cell_run["config"]["update"])
    for update in records(recs, "config"):
        config.update(update["update"])
    assert config["cell"] == params
    assert config["experiment"]["name"] == exp.name and config["experiment"]["tasks"]["math"]
    assert config["experiment"]["slurm"]["setup"] == ["export WANDB_API_KEY=<redacted>"]
    assert config["inputs"] == {"adapter_artifact": ref, "adapter_type": "lora-adapter"}
    assert config["run_name"] == cell and config["include_num_input_tokens_seen"] == "non_padding"  # from HF

    history = [h["item"] for h in records(recs, "history")]
    steps = [h for h in history if "train/loss" in h]
    assert [h["train/global_step"] for h in steps] == [1, 2, 3]
    for key in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/step_time_s"):
        assert all(isinstance(h[key], (int, float)) for h in steps), key
    assert all(h["train/tokens_per_s"] > 0 and h["train/step_time_s"] > 0 for h in steps)
    summary = {}
    for update in records(recs, "summary"):
        summary.update(update["update"])
    assert summary["gsm8k/accuracy"] == 0.25 and summary["arc_easy/accuracy"] == 0.6
    (cell_art,) = records(recs, "artifact")
    assert cell_art["name"] == tracking.artifact_name(exp.name, cell) and cell_art["type"] == "lora-adapter"
    meta = json.loads(cell_art["metadata"])
    assert (meta["adapter_sha256"], meta["manifest"]["parent_sha256"]) == (CELL_SHA, WARMUP_SHA)

    # A requeued cell continues the same run: same id, resume allowed, a second offline segment.
    run = tracking.start_run(exp, layout, "adapt", cell, params, ["adapt", "d2lora"])
    tracking.finish_run(run, {"gsm8k": {"accuracy": 0.3}})
    segments = offline_runs(layout, cell, exp.name)
    assert len(segments) == 2
    (again,) = records(read_run(segments[1]), "run")
    assert again["run_id"] == cell_run["run_id"] and again["resume"] is True

    # The API key is nowhere: not in any file wandb wrote (run files, logs, caches), not on the console.
    leaks = [p for p in wandb_env.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert list(layout.wandb_dir.rglob("*.log")), "expected wandb's debug logs to be scanned"
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out and FAKE_KEY not in err


# ---- the online branches, against stand-ins (no W&B server is reachable here) --------

class FakeConfig(dict):
    def update(self, data, allow_val_change=False):  # noqa: D102 - wandb.Config's signature
        super().update(data)


def test_use_adapter_artifact_online_declares_the_pinned_version():
    used = []
    run = SimpleNamespace(offline=False, config=FakeConfig(),
                          use_artifact=lambda ref, type=None: used.append((ref, type)))
    ref = tracking.use_adapter_artifact(run, "demo-warmup", sha256=WARMUP_SHA)
    assert used == [(f"demo-warmup:sha256-{WARMUP_SHA[:16]}", "lora-adapter")]
    assert run.config["inputs"]["adapter_artifact"] == ref
    assert tracking.use_adapter_artifact(run, "demo-warmup") == "demo-warmup:latest"


def test_link_inputs_declares_recorded_inputs_once(wandb_env, monkeypatch):
    import wandb

    exp = experiment(wandb_env)
    art = SimpleNamespace(qualified_name="me/d2lora/report_fixture-warmup:v0")
    declared = []

    def remote(name, ref, used):
        return SimpleNamespace(path=["me", "d2lora", name], config={"inputs": {"adapter_artifact": ref}} if ref else {},
                               used_artifacts=lambda: used, use_artifact=lambda a: declared.append((name, a)))

    runs = [remote("cell-a", "report_fixture-warmup:latest", []), remote("cell-b", "report_fixture-warmup:latest", [art]),
            remote("lora-cell", None, [])]
    queries = []

    class FakeApi:
        default_entity = "me"

        def runs(self, path, filters):
            queries.append((path, filters))
            return runs

        def artifact(self, name, type=None):
            assert (name, type) == ("me/d2lora/report_fixture-warmup:latest", "lora-adapter")
            return art

    monkeypatch.setattr(wandb, "Api", FakeApi)
    linked = tracking.link_inputs(exp)
    assert queries == [("me/d2lora", {"group": "report_fixture"})]
    assert declared == [("cell-a", art)]
    assert linked == ["me/d2lora/cell-a <- me/d2lora/report_fixture-warmup:v0"]


def test_a_real_warmup_logs_its_schedule_truncation_and_update_size_to_wandb(wandb_env, tiny_experiment: dict) -> None:
    from d2lora_dist.config import experiment_from_dict
    from d2lora_dist.warmup import run_warmup

    tiny_experiment["tracking"] = {"mode": "offline"}
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    result = run_warmup(exp, layout)
    (warm_dir,) = offline_runs(layout, f"{exp.name}-warmup", exp.name)
    summary = {}
    for update in records(read_run(warm_dir), "summary"):
        summary.update(update["update"])
    update = result["train"]["update"]
    assert summary["train/update/phase_rel_max"] == update["phase_rel_max"] > 0
    assert summary["train/optimizer_steps"] == 4 and summary["train/global_batch_size"] == 2
    assert summary["train/truncation/rows"] == 8 and summary["train/tokens_seen"] > 0
