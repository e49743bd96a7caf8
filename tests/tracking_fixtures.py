"""A tiny causal LM for tracking tests: tokenizer trained locally, random 2-layer Llama.

Nothing is downloaded: the tokenizer learns a small BPE vocabulary from a fixed toy corpus.
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SENTENCES = [
    "what is two plus three", "two plus three is five", "the cat sat on the mat",
    "a small model learns to repeat simple sentences", "lora adapters train low rank matrices",
    "the warm up adapter starts the task phase", "seven minus four is three", "name the capital of france",
]


def tiny_tokenizer(vocab_size: int = 300) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"])
    tok.train_from_iterator(SENTENCES * 10, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def sft_rows(n: int = 12) -> list[dict[str, Any]]:
    """Prompt-completion rows (TRL's conversational form)."""
    return [{"prompt": [{"role": "user", "content": SENTENCES[i % 8]}],
             "completion": [{"role": "assistant", "content": SENTENCES[(i + 1) % 8]}]} for i in range(n)]
