"""A tiny random Llama and its tokenizer, built offline in about a second.

The tokenizer is a byte-level BPE trained with `tokenizers` on local text (stdlib
docstrings and a few math sentences), with a chat template and <s>/</s>/<pad> tokens;
the model is a randomly initialised 2-layer Llama (hidden 64). Good for logic tests of
generation and scoring, not for quality.
"""

from __future__ import annotations

import importlib
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
MATH_SENTENCES = [
    "Janet has 16 eggs and eats 3 of them. How many are left? The answer is 13.",
    "A train travels 120 km in 2 hours, so its speed is 60 km per hour.",
    "Question: Which gas do plants take in?\nAnswer: carbon dioxide",
    "Title: Low rank adapters for fast fine tuning of language models",
    "She pays $1,250 for rent and $300 for food, a total of $1,550 dollars.",
]

# Prompts of 1 to ~20 tokens, so batches mix left padding widths.
MIXED_PROMPTS = [
    "hi",
    "The quick answer is a long prompt about json, regular expressions and paths on disk.",
    "Question: Janet has 16 eggs. How many are left?",
    "x",
    "A train travels 120 km in 2 hours.",
]


def _corpus() -> list[str]:
    texts = MATH_SENTENCES * 20
    for name in ("json", "os", "re", "collections", "argparse", "pathlib", "decimal", "textwrap"):
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, attr, None) for attr in dir(module))]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def build_tiny_tokenizer(vocab_size: int = 600) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like Llama-2 tokenizers: BOS is prepended to every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Random init leaves logits nearly flat; a larger output scale makes greedy choices
    # clear-cut, so float reordering between batch shapes cannot flip an argmax.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def greedy_ids(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    """Reference greedy new tokens of one unpadded prompt, straight from HF generate, no stop token."""
    import torch

    from d2lora_dist.evaluate.generation import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()
