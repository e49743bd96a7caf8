"""The adapter artifact: round trip, checksums, shapes, base-model check, no overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2lora_dist import adapters
from d2lora_dist.config import LoraConfig, ModelConfig
from d2lora_dist.modeling import attach_lora, base_fingerprint, load_base_model


@pytest.fixture
def lora_model(tiny_model_dir: Path):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", attn_implementation="sdpa")
    model = attach_lora(load_base_model(cfg, training=True), LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained-looking adapter (fresh B is all zeros)
    return model, cfg


def _save(model, cfg, out: Path) -> dict:
    lineage = {"phase": "warmup", "base_model": base_fingerprint(cfg), "lora": {"r": 4, "alpha": 8}}
    return adapters.save_adapter(model, out, lineage)


def test_round_trip_restores_identical_weights(lora_model, tmp_path: Path) -> None:
    model, cfg = lora_model
    manifest = _save(model, cfg, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert manifest["adapter_sha256"] == adapters.sha256_file(tmp_path / "adapter" / adapters.WEIGHTS)
    assert set(manifest["versions"]) >= {"torch", "peft", "trl", "transformers", "deepspeed"}
    state, loaded = adapters.load_adapter_state(tmp_path / "adapter", base_fingerprint(cfg))
    assert loaded == manifest
    expected = adapters.gathered_state_dict(model)
    assert adapters.state_checksum(state) == adapters.state_checksum(expected)
    assert all(v.numel() > 0 for v in state.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary leftovers


def test_existing_artifact_is_never_overwritten(lora_model, tmp_path: Path) -> None:
    model, cfg = lora_model
    _save(model, cfg, tmp_path / "adapter")
    before = (tmp_path / "adapter" / adapters.MANIFEST).read_text()
    with pytest.raises(adapters.AdapterError, match="already exists; refusing to overwrite"):
        _save(model, cfg, tmp_path / "adapter")
    assert (tmp_path / "adapter" / adapters.MANIFEST).read_text() == before


def test_corrupted_weights_fail_the_checksum(lora_model, tmp_path: Path) -> None:
    model, cfg = lora_model
    _save(model, cfg, tmp_path / "adapter")
    weights = tmp_path / "adapter" / adapters.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(adapters.AdapterError, match="adapter_model.safetensors: checksum mismatch"):
        adapters.verify_adapter(tmp_path / "adapter")


def test_adapter_for_another_base_model_names_what_differs(lora_model, tmp_path: Path) -> None:
    model, cfg = lora_model
    _save(model, cfg, tmp_path / "adapter")
    other = dict(base_fingerprint(cfg), name="meta-llama/Llama-3.1-8B-Instruct", config_sha256="0" * 64)
    with pytest.raises(adapters.AdapterError) as err:
        adapters.load_adapter_state(tmp_path / "adapter", other)
    assert "different base model" in str(err.value)
    assert "name: adapter has" in str(err.value) and "config_sha256" in str(err.value)
    with pytest.raises(adapters.AdapterError, match="different LoRA config; r: adapter has 4, this run has 16"):
        adapters.verify_adapter(tmp_path / "adapter", expected_lora={"r": 16})


def test_empty_shards_are_refused_on_save_and_on_load(lora_model, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, cfg = lora_model
    _save(model, cfg, tmp_path / "adapter")
    path = tmp_path / "adapter"
    manifest = json.loads((path / adapters.MANIFEST).read_text())
    # what a naive save under ZeRO-3 writes: shape-(0,) tensors, with a manifest that matches the files
    save_file({k: torch.empty(0) for k in manifest["tensors"]}, str(path / adapters.WEIGHTS))
    manifest["files"][adapters.WEIGHTS] = adapters.sha256_file(path / adapters.WEIGHTS)
    (path / adapters.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(adapters.AdapterError, match=r"has shape \[0\].*empty shard"):
        adapters.verify_adapter(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.data = torch.empty(0)
    with pytest.raises(adapters.AdapterError, match="refusing to save an empty adapter"):
        _save(model, cfg, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_missing_manifest_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(adapters.AdapterError, match="no manifest.json; not an adapter artifact"):
        adapters.verify_adapter(tmp_path)
    (tmp_path / adapters.MANIFEST).write_text(json.dumps({"files": {adapters.WEIGHTS: "ab"}}))
    with pytest.raises(adapters.AdapterError, match="adapter_model.safetensors listed in the manifest is missing"):
        adapters.verify_adapter(tmp_path)


def test_tensors_of_another_rank_than_the_manifest_are_refused(lora_model, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, cfg = lora_model
    _save(model, cfg, tmp_path / "adapter")
    path = tmp_path / "adapter"
    manifest = json.loads((path / adapters.MANIFEST).read_text())
    # rank-8 tensors under a manifest that says r = 4, every checksum and recorded shape consistent
    wider = {k: (torch.zeros(8, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 8))
             for k, v in load_file(str(path / adapters.WEIGHTS)).items()}
    save_file(wider, str(path / adapters.WEIGHTS))
    manifest["files"][adapters.WEIGHTS] = adapters.sha256_file(path / adapters.WEIGHTS)
    manifest["tensors"] = {k: list(v.shape) for k, v in wider.items()}
    (path / adapters.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(adapters.AdapterError, match="does not have LoRA rank 4"):
        adapters.verify_adapter(path)
    lineage = {"phase": "warmup", "base_model": base_fingerprint(cfg), "lora": {"r": 8, "alpha": 8}}
    with pytest.raises(adapters.AdapterError, match="does not have LoRA rank 8"):
        adapters.save_adapter(model, tmp_path / "mislabelled", lineage)  # r = 4 tensors called r = 8
    assert not (tmp_path / "mislabelled").exists()
