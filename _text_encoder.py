# Section 5 of model.py, kept apart while model.py is edited elsewhere: paste from the banner down, and drop the
# imports that model.py already has.
import json
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from model import CheckpointError, assign_weights, component_dir, read_tensors, safetensors_files, safetensors_shapes

# ----------------------------------------------------------------------------------------------------------------
# 5. Text encoder (Qwen3-4B through transformers; Z-Image reads the second-to-last hidden state)
# ----------------------------------------------------------------------------------------------------------------

# What a config-less single file (ComfyUI's qwen_3_4b.safetensors) is read with, when its shapes do not say otherwise.
QWEN3_4B_DEFAULTS = dict(max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         rms_norm_eps=1e-6, tie_word_embeddings=True)


class TextEncoder:
    """encode(prompts) -> (cap [B, L, hidden], cap_mask [B, L] bool), L = longest prompt in tokens (<= 512).

    Same features as diffusers' ZImagePipeline._encode_prompt. It pads every prompt to 512 tokens; with right
    padding and causal attention the real tokens never see the pads, so padding to the longest prompt gives the
    same rows for a fraction of the compute.
    """
    max_length = 512

    def __init__(self, tokenizer, model: Qwen3Model):
        self.tokenizer, self.model = tokenizer, model
        self.tokenizer.padding_side = "right"  # real tokens first: the rows the DiT and the reference keep

    @torch.no_grad()  # not inference_mode: the features feed DiT training graphs, which must be able to save them
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("this TextEncoder was released; load it again to encode more prompts")
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        batch = self.tokenizer(texts, padding="longest", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(self.device)
        mask = batch.attention_mask.bool()
        cap = self.model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        return cap.masked_fill(~mask[..., None], 0), mask

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)  # device only: the rotary inv_freq must stay fp32
        return self

    def release(self):
        """Free the weights now (even if someone else holds the module): the DiT needs the memory next."""
        self.model.to("meta")
        self.model = None


def qwen3_config_from_shapes(shapes: dict[str, tuple]) -> Qwen3Config:
    """The Qwen3 config of a checkpoint without config.json: sizes from tensor shapes, the rest Qwen3-4B's."""
    shapes = {k.removeprefix("model."): tuple(v) for k, v in shapes.items()}
    if "embed_tokens.weight" not in shapes or "layers.0.self_attn.q_norm.weight" not in shapes:
        raise CheckpointError(f"not a Qwen3 text encoder: no model.embed_tokens / layers.0.self_attn.q_norm among "
                              f"keys {sorted(shapes)[:5]}")
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                       num_hidden_layers=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers.")),
                       num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
                       num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
                       intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0], **QWEN3_4B_DEFAULTS)


def qwen3_from_tensors(config: Qwen3Config, tensors, device="cpu", dtype=torch.bfloat16) -> Qwen3Model:
    """A Qwen3Model that returns hidden_states[-2] as its last_hidden_state, filled from published `model.*` keys.

    Only that output is ever used, so the last decoder layer and the final norm are dropped (1/36 of the compute
    and of the memory): the remaining layers' output is exactly hidden_states[-2] of the full model.
    """
    with torch.device("meta"):
        model = Qwen3Model(config)
    last = config.num_hidden_layers - 1
    model.layers, model.norm = model.layers[:last], nn.Identity()
    unused = ("lm_head.", f"layers.{last}.", "norm.")  # lm_head is tied to embed_tokens when a file carries it
    renamed = ((k.removeprefix("model."), t) for k, t in tensors)
    kept = ((k, t) for k, t in renamed if not k.startswith(unused))
    assign_weights(model, kept, "Qwen3 text encoder (model.*)", device=device, dtype=dtype)
    # inv_freq is a non-persistent buffer: no checkpoint holds it and meta init left it empty; build it for real.
    model.rotary_emb = Qwen3RotaryEmbedding(config).to(device)
    return model.eval()


def _tokenizer_folder(given, *fallbacks) -> Path:
    """The tokenizer folder: `given` if the caller named one, else the first fallback holding tokenizer files."""
    candidates = [Path(given)] if given is not None else fallbacks
    for folder in candidates:
        if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
            return folder
    raise CheckpointError(f"no tokenizer (tokenizer.json / tokenizer_config.json) in {[str(c) for c in candidates]}; "
                          "pass tokenizer=<the Z-Image tokenizer/ folder>")


def load_text_encoder(path, device="cpu", dtype=torch.bfloat16, tokenizer=None) -> TextEncoder:
    """Load from a Z-Image repo root, its text_encoder/ folder, or a single qwen_3_4b.safetensors file.

    The tokenizer comes from `tokenizer` (a folder) if given, else the repo's tokenizer/ folder (a sibling of
    text_encoder/ or of the single file), else the text_encoder folder itself.
    """
    path = Path(path)
    if path.is_file():
        config = qwen3_config_from_shapes(safetensors_shapes([path]))
        files, tok_folder = [path], _tokenizer_folder(tokenizer, path.parent / "tokenizer")
    elif path.is_dir():
        path = component_dir(path, "text_encoder")
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} holds neither text_encoder/ nor config.json (found "
                                  f"{sorted(p.name for p in path.iterdir())[:8]}); pass the Z-Image repo root, "
                                  "its text_encoder/ folder or a qwen_3_4b.safetensors file")
        raw = json.loads((path / "config.json").read_text())
        if raw.get("model_type") != "qwen3":
            kind = raw.get("_class_name") or raw.get("model_type") or "unknown"
            raise CheckpointError(f"{path} is not a Qwen3 text encoder: found {kind} config with keys "
                                  f"{sorted(raw)[:8]}; pass the Z-Image repo root or its text_encoder/ folder")
        config = Qwen3Config.from_pretrained(path, local_files_only=True)
        files, tok_folder = safetensors_files(path), _tokenizer_folder(tokenizer, path.parent / "tokenizer", path)
    else:
        raise CheckpointError(f"{path} does not exist")
    model = qwen3_from_tensors(config, read_tensors(files), device=device, dtype=dtype)
    return TextEncoder(AutoTokenizer.from_pretrained(tok_folder, local_files_only=True), model)
