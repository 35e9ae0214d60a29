"""A word-level tokenizer small enough for the zoo's 128-token vocabulary, with a chat template.

Tiny random models have no tokenizer; tests that need a real `transformers` tokenizer (chat
templates, lm-eval's `hf` model) build this one offline and save it beside the model.
"""

from __future__ import annotations

from pathlib import Path

import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

# Ids 0/1/2 match the zoo configs' bos/eos/pad, so model and tokenizer agree on special tokens.
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>", "<system>", "<user>", "<assistant>"]
WORDS = ["the", "a", "is", "of", "and", "to", "in", "it", "on", "at", "by", "red", "blue", "green", "small",
         "large", "fast", "slow", "cat", "dog", "bird", "fish", "tree", "river", "stone", "cloud", "hello",
         "world", "fine", "thanks", "what", "colour", "sky", "grass", "sea", "answer", "question", "yes", "no",
         "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", ".", ",", "?", "!"]

# Each turn: a role token, the content, then end-of-sequence (SmolLM2-style ChatML, in miniature).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> tf.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over `WORDS` (unknown words: <unk>); < 128 ids."""
    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS])}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    out.chat_template = chat_template
    return out


def save_tiny_llama(path: Path, layers: int = 2, hidden: int = 32,
                    chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A tiny Llama with `tiny_tokenizer` saved as a Hugging Face model directory."""
    from subfit_fx.zoo import tiny_model

    tiny_model("llama", hidden=hidden, layers=layers).save_pretrained(path)
    tiny_tokenizer(chat_template).save_pretrained(path)
    return path
