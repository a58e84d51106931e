"""Tiny, offline stand-ins for Z-Image's text side: a Qwen-style tokenizer and a random 3-layer Qwen3.

Both are written in the published Hugging Face layout (tokenizer/, text_encoder/ with sharded `model.*` keys), so
the loaders under test read them exactly as they would read the real Z-Image repo.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# Qwen3's template, reduced to what prompts use: plain role turns, and a generation prompt whose empty think block
# appears only when thinking is switched off (Z-Image encodes with enable_thinking=True, so it has none).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a watercolor painting of a mountain lake at sunrise, soft light",
    "two dogs playing in the snow, highly detailed, 4k",
    "user assistant system the of and with in on a an",
]


def make_tiny_tokenizer(folder) -> PreTrainedTokenizerFast:
    """Byte-level BPE (like Qwen's) trained on a few captions: any text tokenizes, at worst one token per byte."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="right", chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_text_encoder(root, seed: int = 0, num_layers: int = 3) -> dict:
    """Write root/tokenizer/ and root/text_encoder/ (config.json + >= 2 safetensors shards + index, keys `model.*`).

    Weights are random with unit-scale activations and non-trivial norm gains, so a wrong mapping shows up.
    Rope theta and norm eps are Qwen3-4B's, the values a single file (which has no config) is read with.
    """
    root = Path(root)
    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=40960,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    # Saved as the causal LM, like the published folder: its keys carry `model.` and the tied lm_head is not stored.
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name == "embed_tokens.weight":
                p.normal_()
            else:
                p.normal_(std=p.shape[1] ** -0.5)
    model.save_pretrained(root / "text_encoder", max_shard_size="150KB")
    return {"root": root, "text_encoder": root / "text_encoder", "tokenizer": root / "tokenizer",
            "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers}
