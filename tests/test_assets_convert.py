"""SmolLM2-135M-Instruct converted from the GGUF in its pinned wheel (`d2lora_dist.assets.convert`)
is a plain fp32 HF model directory that loads offline and answers."""

from __future__ import annotations

import json
import os

import pytest

from d2lora_dist.assets import ensure_asset, resolve_asset_uri
from tests.assets_fixtures import session_cache


@pytest.mark.slow
def test_smollm2_is_a_plain_hf_model_dir(tmp_path_factory: pytest.TempPathFactory,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = session_cache(tmp_path_factory)
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    path = ensure_asset("smollm2", cache, progress=False)
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # set only while converting
    assert resolve_asset_uri("asset:smollm2/config.json", cache) == str(path / "config.json")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (path / "model.safetensors").stat().st_size > 500e6  # fp32, not the 98 MB Q4_1

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_gguf_file_is_parsed_once_per_conversion_and_the_reader_is_restored(tmp_path) -> None:
    """transformers opens the GGUF three times while converting (tokenizer, config, weights); inside
    the conversion every open gets the one parse, and gguf.GGUFReader is itself again afterwards."""
    import gguf
    import numpy as np

    from d2lora_dist.assets.convert import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the str and the Path name one file
        assert [t.name for t in first.tensors] == ["token_embd.weight"]
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first
