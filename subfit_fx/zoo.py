"""Tiny random-init configs of the architectures subfit_fx is tested on.

They build offline in milliseconds, so tests, examples and `subfit-fx inspect` (with no model)
never touch a hub.

Example:
    >>> from subfit_fx.zoo import tiny_model
    >>> model = tiny_model("llama", layers=2)
    >>> model.config.num_hidden_layers
    2
"""

from __future__ import annotations

import torch
import transformers as tf

from subfit_fx.errors import InputError

__all__ = ["ARCHITECTURES", "tiny_config", "tiny_model"]

_VOCAB = 128
_POS = 128


def _llama_like(cls, hidden, layers, **extra):
    return cls(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=_VOCAB,
        max_position_embeddings=_POS, **extra,
    )


def _build(arch: str, hidden: int, layers: int) -> tf.PretrainedConfig:
    no_special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if arch == "llama":
        return _llama_like(tf.LlamaConfig, hidden, layers, **no_special)
    if arch == "mistral":
        return _llama_like(tf.MistralConfig, hidden, layers, sliding_window=None, **no_special)
    if arch == "qwen2":
        return _llama_like(tf.Qwen2Config, hidden, layers, **no_special)
    if arch == "qwen3":
        return _llama_like(tf.Qwen3Config, hidden, layers, head_dim=hidden // 4, **no_special)
    if arch == "gemma":
        return _llama_like(tf.GemmaConfig, hidden, layers, head_dim=hidden // 4, **no_special)
    if arch == "gemma2":
        return _llama_like(tf.Gemma2Config, hidden, layers, head_dim=hidden // 4,
                           sliding_window=64, **no_special)
    if arch == "phi3":
        return _llama_like(tf.Phi3Config, hidden, layers, **no_special)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=_VOCAB,
                             n_positions=_POS, bos_token_id=0, eos_token_id=1)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, vocab_size=_VOCAB, max_position_embeddings=_POS,
                            word_embed_proj_dim=hidden, **no_special)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=4, vocab_size=_VOCAB,
                                max_position_embeddings=_POS, **no_special)
    if arch == "bert":
        return tf.BertConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, vocab_size=_VOCAB,
                             max_position_embeddings=_POS, pad_token_id=0)
    raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt",
                 "gpt_neox", "bert")


def tiny_config(arch: str, hidden: int = 64, layers: int = 2) -> tf.PretrainedConfig:
    """Return a tiny config of `arch` (one of `ARCHITECTURES`).

    Example:
        >>> tiny_config("gpt2", hidden=32, layers=3).n_layer
        3
    """
    return _build(arch, hidden, layers)


def tiny_model(arch: str, hidden: int = 64, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """Build a random-init model of `arch` in eval mode (BERT as an encoder, the rest as causal LMs).

    Example:
        >>> tiny_model("bert", layers=2).config.model_type
        'bert'
    """
    config = tiny_config(arch, hidden, layers)
    torch.manual_seed(seed)
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(config)
    return model.eval()
