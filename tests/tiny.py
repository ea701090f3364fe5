"""Tiny randomly initialised Hugging Face checkpoints (Llama, Qwen2, Qwen3) for unit tests.

Everything is built in-process: a byte-level BPE tokenizer trained on a few sentences and a
4-layer decoder, so tests need no network and run in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SENTENCES = [
    "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "Ferries leave the harbour every morning at seven and return at dusk.",
    "What is the capital of France? Paris is the capital of France.",
    "Memory sparse attention routes a question to the documents it needs.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]-",
]


def save_tiny_tokenizer(path: Path, *, specials: list[str] = SPECIALS, sentences: list[str] = _SENTENCES,
                        vocab_size: int = 400) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def hf_config(family: str, vocab_size: int, *, layers: int = 4, rope: dict | None = None,
              tie: bool = True, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              rms_norm_eps=1e-6, tie_word_embeddings=tie, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if rope:
        rope_parameters.update(rope)
    kw["rope_parameters"] = rope_parameters
    kw.update(overrides)
    return cls(**kw)


def save_tiny_model(path: Path, family: str = "llama", *, seed: int = 0, rope: dict | None = None,
                    **overrides) -> Path:
    """Save a random tiny checkpoint plus tokenizer into `path` and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    save_tiny_tokenizer(path)
    vocab = len(AutoTokenizer.from_pretrained(str(path)))
    cfg = hf_config(family, vocab, rope=rope, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: perturb them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return path
