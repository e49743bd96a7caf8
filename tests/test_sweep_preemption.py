"""PreemptionWatcher / PreemptionCallback / exit_if_preempted in one process.

The Slurm side of the chain (USR1 -> batch shell -> srun -> ranks, requeue) is tested on
the local cluster in tests/test_sweep_slurm_cluster.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from d2lora_dist.sweep import preemption
from d2lora_dist.sweep.preemption import (
    MARKER_ENV,
    PREEMPTED_EXIT_CODE,
    PreemptionWatcher,
    exit_if_preempted,
)


def test_watcher_sets_flag_chains_previous_handler_and_restores_it():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with PreemptionWatcher() as watcher:
            assert not watcher.preempted
            os.kill(os.getpid(), signal.SIGUSR1)
            assert watcher.preempted and seen == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)  # the previous handler is back
        assert seen == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_watcher_outside_the_main_thread_warns_and_does_not_install():
    import threading

    out = {}

    def body():
        with pytest.warns(UserWarning, match="not in the main thread"):
            out["w"] = PreemptionWatcher()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert not out["w"].installed


def test_exit_if_preempted_writes_marker_and_exits_with_the_code(tmp_path, monkeypatch):
    marker = tmp_path / "preempted" / "123"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    watcher = PreemptionWatcher(install=False)
    exit_if_preempted(watcher)  # not preempted: returns
    watcher.request()
    with pytest.raises(SystemExit) as e:
        exit_if_preempted(watcher)
    assert e.value.code == PREEMPTED_EXIT_CODE == 75 and marker.exists()


def test_usr1_during_training_saves_checkpoint_at_step_and_stops(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    class SignalAtStep(transformers.TrainerCallback):
        """Plays Slurm: USR1 to ourselves at the end of optimizer step 2."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    marker = tmp_path / "preempted" / "42"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 32, (16, 8))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2, save_strategy="no",
        logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    with PreemptionWatcher() as watcher:
        callback = preemption.PreemptionCallback(watcher)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=[SignalAtStep(), callback])
        trainer.train()
    assert watcher.preempted and callback.stopped_at_step == 2
    assert trainer.state.global_step == 2  # stopped, not 10
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    assert marker.exists()  # written once the checkpoint was saved, before any exit
