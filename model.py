"""
l2p model.py: every network of the project, in one file, loaded straight from the published safetensors.

Conventions (everywhere in l2p): images are float NCHW in [-1, 1]; sigma in [0, 1] with 1 = pure noise;
x_sigma = (1 - sigma) * x0 + sigma * eps; every model's forward takes sigma and returns v = eps - x0.
Published formats are converted at their boundary (loading), nowhere else.

Sections
  1. Blocks         RoPE (any number of axes), attention (q/k RMSNorm, SDPA), SwiGLU, the (modulated) Z-Image block,
                    run_block (gradient checkpointing), compile_blocks
  2. Z-Image DiT    ZImageConfig, ZImageDiT: forward(x, sigma, cap, cap_mask) -> v (latent, or L2P pixels)
  3. FLUX.2 DiT     Flux2Config, Flux2DiT (klein 4B MMDiT: double- then single-stream blocks): the same forward
  4. L2P head       DetailerHead, PixelLift and fit_lift (the latent-aligned conversion), dit_forward (both DiTs'
                    forward) and pixel_velocity (the pixel model's), l2p_config (latent config + recipe -> pixel
                    config; l2p_fields reads the recipe back from a checkpoint), set_trainable (the freeze policy)
  5. VAEs           FluxVAE (FLUX.1, Z-Image's) and Flux2VAE: encode(img) -> normalised latent, decode(latent) -> img
  6. Text encoder   TextEncoder: Qwen3 through transformers, encode(prompts) -> (cap, cap_mask), Z-Image's recipe or
                    FLUX.2's; load_text_encoder (repo root, folder or single file)
  7. Loading        the published layouts renamed to ours, meta-device init + assign:
                    open_checkpoint / load_model (Z-Image, L2P, FLUX.2; every published layout), load_vae
  8. Sampling       shifted sigma grid, per-seed noise, Euler sampler with CFG, generate, the sources' presets
  9. I/O            atomic writes, safetensors read and write (both streamed), PNG and grids, the caption-feature
                    cache, prompt files, training data (synth.py output, metadata.jsonl / .csv folders, webdataset
                    shards), processes (torchrun)
 10. Memory plan    train.py's bytes per process by mode (standard, low memory, ZeRO) and the mode that fits
"""

import csv
import hashlib
import io
import json
import math
import os
import re
import resource
import sys
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from functools import partial
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, ClassVar, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from PIL import Image, ImageOps, PngImagePlugin
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

if TYPE_CHECKING:  # annotations only: transformers is imported lazily (section 6)
    from transformers import Qwen3Config, Qwen3Model

# ----------------------------------------------------------------------------------------------------------------
# 1. Blocks
# ----------------------------------------------------------------------------------------------------------------


def rope_freqs(pos_ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """pos_ids [B, S, n_axes] int -> e^(i angle) [B, S, 1, head_dim / 2] complex64 (the 1 broadcasts over heads).

    Angles are pos * theta^(-2i/d) per axis, formed in float64 so large positions keep their precision.
    """
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos_ids.device) / dim)
        angles.append(pos_ids[..., axis, None].double() * inv_freq)
    angles = torch.cat(angles, dim=-1).float().unsqueeze(2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, head_dim]; rotation pairs are interleaved: (x0, x1), (x2, x3), ... taken as x0 + i x1 and
    rotated by one complex product (one kernel forward and backward, instead of six elementwise passes + a stack)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


def timestep_sinusoid(t: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """t [B] -> [B, channels] fp32, [cos | sin] at frequencies 10000^(-i / half), i < half (Z-Image and FLUX.2)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # a list only to keep the published key to_out.0
        self.norm_q = nn.RMSNorm(dim // n_heads, eps=eps)
        self.norm_k = nn.RMSNorm(dim // n_heads, eps=eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None):
        B, S, dim = x.shape
        q = self.norm_q(self.to_q(x).view(B, S, self.n_heads, -1))  # [B, S, heads, head_dim]
        k = self.norm_k(self.to_k(x).view(B, S, self.n_heads, -1))
        v = self.to_v(x).view(B, S, self.n_heads, -1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S], True = attend
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(B, S, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTBlock(nn.Module):
    """Pre- and post-norm ("sandwich") block; with `modulated`, adaLN scales and tanh gates from the timestep."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, eps: float, adaln_dim: int, modulated: bool):
        super().__init__()
        self.attention = Attention(dim, n_heads, eps)
        self.feed_forward = FeedForward(dim, ffn_dim)
        self.attention_norm1 = nn.RMSNorm(dim, eps=eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=eps)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(adaln_dim, 4 * dim))

    def forward(self, x, rope, key_mask, adaln=None):
        if adaln is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=-1)
        x = x + gate_msa.tanh() * self.attention_norm2(self.attention(self.attention_norm1(x) * (1 + scale_msa), rope,
                                                                      key_mask))
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


def run_block(net: nn.Module, block: nn.Module, *args):
    """block(*args), recomputed in the backward pass instead of keeping its activations when
    net.gradient_checkpointing is on."""
    if net.gradient_checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def compile_blocks(net: nn.Module) -> nn.Module:
    """torch.compile every transformer block in place (norms, modulation, RoPE and the MLP fused by the compiler);
    embedders, the head and the sampler stay eager. The first call of each new shape compiles."""
    for module in net.modules():
        if isinstance(module, (DiTBlock, DoubleStreamBlock, SingleStreamBlock)):
            module.compile()
    return net


# ----------------------------------------------------------------------------------------------------------------
# 2. Z-Image DiT
# ----------------------------------------------------------------------------------------------------------------

SEQ_MULTIPLE = 32  # Z-Image pads both the caption and the image token runs to a multiple of 32
ADALN_DIM = 256
ZIMAGE_LATENT_PATCH = 2  # Z-Image's only latent patch: 2 x 2 positions of its 16-channel latent per token
SOURCE_TOKEN_PIXELS = 16  # both sources' latent token covers 16 x 16 pixels (FLUX.1's VAE x8 x 2, FLUX.2's x16)


@dataclass
class ZImageConfig:
    family: ClassVar[str] = "zimage"  # the one place scripts tell the two families apart
    in_channels: int = 16
    patch_size: int = 2
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    pixel_head: bool = False  # True: the L2P pixel model (Detailer Head instead of the final layer), see section 4
    head_width: int = 64  # Detailer Head channels at H/2 (level "1"); the released heads use 64, toy models less
    # the latent-aligned pixel model (section 4, PixelLift); all off = the paper's recipe and the released files
    lift_dim: int = 0  # > 0: the source's final layer is kept and its latent prediction lifted to pixels
    x_prediction: bool = False  # the head predicts x0 and v = (x - x0) / max(sigma, X0_MIN_SIGMA)
    head_sigma: bool = False  # the head reads sigma as an input channel
    head_lift: bool = False  # the head reads the lifted prediction (3 more input channels)
    head_token_norm: bool = False  # the head reads the tokens' parameter-free LayerNorm instead of the raw tokens
    source_sampler: tuple = ()  # a lift's: its source's (steps, guidance, static shift), sample.py's defaults

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_DIM)


def round_up(n, multiple: int = SEQ_MULTIPLE):
    return (n + multiple - 1) // multiple * multiple


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], vector order (ph, pw, c) with c fastest."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: torch.Tensor, p: int, H: int, W: int) -> torch.Tensor:
    """[B, (H/p)(W/p), p*p*C] -> [B, C, H, W]; the inverse of patchify."""
    B = tokens.shape[0]
    x = tokens.view(B, H // p, W // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, -1, H, W)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, hidden: int = 1024, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, adaln_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(self, x, adaln):
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(adaln).unsqueeze(1)))


class ZImageDiT(nn.Module):
    """Z-Image's single-stream DiT. forward(x, sigma, cap, cap_mask) -> v = eps - x0 (the negated raw output).
    With cfg.pixel_head it is the L2P pixel model: RGB patches in, the Detailer Head out (section 4).

    Sequence per sample: [image tokens, image pads | caption tokens, caption pads | batch padding]. Image and
    caption pads are real tokens (learned pad embeddings that attend and are attended to, as in the source); only
    batch padding, which exists when captions in a batch differ in padded length, is cut by the key mask.
    """

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        assert dim // cfg.n_heads == sum(cfg.axes_dims), "head_dim must equal the sum of the RoPE axes"
        block = lambda modulated: DiTBlock(dim, cfg.n_heads, cfg.ffn_dim, cfg.norm_eps, cfg.adaln_dim, modulated)
        self.all_x_embedder = nn.ModuleDict({f"{p}-1": nn.Linear(p * p * cfg.in_channels, dim)})
        if cfg.pixel_head:
            out_sign = 1.0 if cfg.x_prediction else self.v_sign  # the paper's Z-Image heads predict x0 - eps too
            self.local_decoder = DetailerHead(head_channels(cfg), dim, p, cfg.head_width, cfg.in_channels, out_sign)
        if cfg.lift_dim:  # the lifted pixel model keeps the source's final layer, under the source's name
            self.lift = PixelLift(cfg.lift_dim, p * p * cfg.in_channels)
            self.all_final_layer = nn.ModuleDict({f"{ZIMAGE_LATENT_PATCH}-1": FinalLayer(dim, cfg.lift_dim,
                                                                                          cfg.adaln_dim)})
        elif not cfg.pixel_head:
            self.all_final_layer = nn.ModuleDict({f"{p}-1": FinalLayer(dim, p * p * cfg.in_channels, cfg.adaln_dim)})
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(nn.RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps),
                                          nn.Linear(cfg.cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.noise_refiner = nn.ModuleList([block(True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([block(False) for _ in range(cfg.n_refiner_layers)])
        self.layers = nn.ModuleList([block(True) for _ in range(cfg.n_layers)])
        self.gradient_checkpointing = False

    def transformer(self, tokens: torch.Tensor, grid: tuple[int, int], sigma: torch.Tensor, cap: torch.Tensor,
                    cap_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything between the patch embedder's input and the final layer.

        tokens [B, N, patch_dim] (N = grid h * w), sigma [B], cap [B, L, cap_feat_dim], cap_mask [B, L] bool.
        Returns the last layer's image tokens [B, N, dim] and the timestep embedding adaln [B, 256].
        """
        B, N, _ = tokens.shape
        dtype, device = self.cap_pad_token.dtype, tokens.device
        if cap_mask.dtype != torch.bool or cap_mask.shape != cap.shape[:2]:
            raise ValueError(f"cap_mask must be bool [B, L] matching cap {tuple(cap.shape)}, got "
                             f"{cap_mask.dtype} {tuple(cap_mask.shape)}")
        cap_len = cap_mask.sum(1)  # [B]
        if (cap_len == 0).any():
            raise ValueError("a caption has no valid token (cap_mask all False); encode the empty prompt instead")
        sigma = sigma.to(device=device, dtype=torch.float32).expand(B)
        adaln = self.t_embedder((1 - sigma) * self.cfg.t_scale).to(dtype)

        # Caption: valid rows first (masks may be left-padded), padded per sample to a multiple of 32.
        order = torch.sort((~cap_mask).to(torch.uint8), dim=1, stable=True).indices
        cap = torch.gather(cap, 1, order[..., None].expand_as(cap))
        cap_padded_len = round_up(cap_len)  # [B]
        L = int(cap_padded_len.max())
        cap = F.pad(cap, (0, 0, 0, max(0, L - cap.shape[1])))[:, :L]
        j = torch.arange(L, device=device)
        c = self.cap_embedder(cap.to(dtype))
        c = torch.where((j[None, :] < cap_len[:, None])[..., None], c, self.cap_pad_token)  # [B, L, dim]
        cap_valid = j[None, :] < cap_padded_len[:, None]  # [B, L]; False = batch padding

        # Image: N tokens + x_pad_token up to a multiple of 32 (same for every sample of the batch).
        Np = round_up(N)
        x = self.all_x_embedder[f"{self.cfg.patch_size}-1"](tokens.to(dtype))
        x = torch.cat([x, self.x_pad_token.expand(B, Np - N, -1)], dim=1)  # [B, Np, dim]

        # Position ids: caption (1 + j, 0, 0); image (padded caption length + 1, row, col); image pads (0, 0, 0).
        h, w = grid
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        img_ids = torch.zeros(B, Np, 3, dtype=torch.long, device=device)
        img_ids[:, :N, 0] = (cap_padded_len + 1)[:, None]
        img_ids[:, :N, 1], img_ids[:, :N, 2] = rows, cols
        cap_ids = torch.zeros(B, L, 3, dtype=torch.long, device=device)
        cap_ids[..., 0] = 1 + j
        freqs = rope_freqs(torch.cat([img_ids, cap_ids], dim=1), self.cfg.axes_dims, self.cfg.rope_theta)
        img_rope, cap_rope = freqs[:, :Np], freqs[:, Np:]

        cap_key_mask = None if bool(cap_valid.all()) else cap_valid
        for block in self.noise_refiner:
            x = run_block(self, block, x, img_rope, None, adaln)
        for block in self.context_refiner:
            c = run_block(self, block, c, cap_rope, cap_key_mask)
        joint = torch.cat([x, c], dim=1)  # image first
        joint_key_mask = None if cap_key_mask is None else F.pad(cap_key_mask, (Np, 0), value=True)
        for block in self.layers:
            joint = run_block(self, block, joint, freqs, joint_key_mask, adaln)
        return joint[:, :N], adaln

    v_sign = -1.0  # Z-Image's final layer (and the released Detailer Heads' out_conv) predict x0 - eps

    def latent_output(self, hidden: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        """The source's final layer: last-layer tokens [B, N, dim] -> latent v = eps - x0 per token."""
        return self.v_sign * next(iter(self.all_final_layer.values()))(hidden, adaln)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cap: torch.Tensor, cap_mask: torch.Tensor,
                span_detail: bool = False) -> torch.Tensor:
        """x [B, C, H, W] (latent, or pixels for L2P), sigma [B] (1 = noise), cap [B, L, cap_feat_dim],
        cap_mask [B, L] bool -> v = eps - x0 [B, C, H, W] fp32: dit_forward."""
        return dit_forward(self, x, sigma, cap, cap_mask, span_detail)


# ----------------------------------------------------------------------------------------------------------------
# 3. FLUX.2 MMDiT (FLUX.2 [klein] 4B: double-stream blocks, then single-stream blocks, shared modulation)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Flux2Config:
    # field names are the keys of diffusers' transformer/config.json (Flux2Transformer2DModel), so config_from_json
    # reads it directly; the defaults are FLUX.2 [klein] 4B's (diffusers' own defaults are FLUX.2 [dev]'s)
    family: ClassVar[str] = "flux2"
    in_channels: int = 128  # the 2x2-patchified 32-channel VAE latent
    patch_size: int = 1  # one token per position of that latent: 16 x 16 pixels
    num_layers: int = 5  # double-stream blocks
    num_single_layers: int = 20
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 7680  # Qwen3-4B hidden states of 3 layers, side by side
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)  # (t, h, w, l) position axes
    rope_theta: float = 2000.0
    eps: float = 1e-6
    pixel_head: bool = False  # True: the L2P pixel model (RGB patches, the Detailer Head instead of norm/proj_out)
    head_width: int = 64  # Detailer Head channels at H/2, as for Z-Image
    lift_dim: int = 0  # the latent-aligned pixel model, as for Z-Image (norm_out and proj_out are kept)
    x_prediction: bool = False
    head_sigma: bool = False
    head_lift: bool = False
    head_token_norm: bool = False  # the head reads LayerNorm(tokens), what norm_out applies before its modulation
    source_sampler: tuple = ()  # as for Z-Image; its shift 0: exp(mu) for the token count
    single_tail: int = 0  # > 0: the last single_tail single blocks read a private copy of the single modulation

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def cap_feat_dim(self) -> int:  # the name the scripts share with ZImageConfig
        return self.joint_attention_dim


def modulate(x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without weights, then (1 + scale) * x + shift; scale1 is 1 + scale, formed once per forward."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), scale1)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, S, heads, head_dim] (q, k already RMS-normed) -> [B, S, heads * head_dim]; no mask, FLUX.2
    attends to every token, caption pads included."""
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class Modulation(nn.Module):
    """shift, scale, gate sets from the timestep embedding; one per block type, shared by all its blocks."""

    def __init__(self, dim: int, n_sets: int):
        super().__init__()
        self.n_sets = n_sets
        self.linear = nn.Linear(dim, 3 * n_sets * dim, bias=False)

    def forward(self, temb: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """temb [B, dim] -> n_sets x (shift, 1 + scale, gate), each [B, 1, dim]."""
        chunks = self.linear(F.silu(temb)).unsqueeze(1).chunk(3 * self.n_sets, dim=-1)
        return [(chunks[i], 1 + chunks[i + 1], chunks[i + 2]) for i in range(0, 3 * self.n_sets, 3)]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)  # rows [gate | up]
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.linear_in(x).chunk(2, dim=-1)
        return self.linear_out(F.silu(gate) * up)


class JointAttention(nn.Module):
    """Image and caption streams, each with its own projections and QK norms, attending as one [caption; image]
    sequence. Keys follow diffusers: to_* / norm_* for the image, add_*_proj / norm_added_* for the caption."""

    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads, head_dim = n_heads, dim // n_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # a list only to keep the published key to_out.0
        self.to_add_out = nn.Linear(dim, dim, bias=False)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, N, dim], txt [B, L, dim], rope [1, L + N, 1, head_dim / 2] -> (img, txt) attention outputs."""
        L = txt.shape[1]
        heads = lambda x: x.unflatten(-1, (self.n_heads, -1))  # [B, S, dim] -> [B, S, heads, head_dim]
        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img)))], dim=1)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img)))], dim=1)
        v = torch.cat([heads(self.add_v_proj(txt)), heads(self.to_v(img))], dim=1)
        out = joint_attention(q, k, v, rope)  # [B, L + N, dim]
        return self.to_out[0](out[:, L:]), self.to_add_out(out[:, :L])


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: Flux2Config):
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointAttention(cfg.dim, cfg.num_attention_heads, cfg.eps)
        self.ff = SwiGLU(cfg.dim, cfg.mlp_hidden)
        self.ff_context = SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(self, img, txt, rope, mod_img, mod_txt):
        """img [B, N, dim], txt [B, L, dim]; mod_* = the two (shift, 1 + scale, gate) sets: attention, then MLP."""
        (shift1, scale1, gate1), (shift2, scale2, gate2) = mod_img
        (c_shift1, c_scale1, c_gate1), (c_shift2, c_scale2, c_gate2) = mod_txt
        img_attn, txt_attn = self.attn(modulate(img, shift1, scale1, self.eps),
                                       modulate(txt, c_shift1, c_scale1, self.eps), rope)
        img = torch.addcmul(img, gate1, img_attn)
        img = torch.addcmul(img, gate2, self.ff(modulate(img, shift2, scale2, self.eps)))
        txt = torch.addcmul(txt, c_gate1, txt_attn)
        txt = torch.addcmul(txt, c_gate2, self.ff_context(modulate(txt, c_shift2, c_scale2, self.eps)))
        return img, txt


class ParallelAttentionMLP(nn.Module):
    """Attention and SwiGLU MLP side by side: one input projection [q | k | v | gate | up] and one output projection
    of [attention | MLP] (diffusers names the pair `attn`)."""

    def __init__(self, dim: int, n_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.n_heads, self.split = n_heads, (dim, dim, dim, mlp_hidden, mlp_hidden)
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.norm_q, self.norm_k = nn.RMSNorm(dim // n_heads, eps=eps), nn.RMSNorm(dim // n_heads, eps=eps)
        self.to_out = nn.Linear(dim + mlp_hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # [B, S, dim] -> [B, S, dim]
        q, k, v, gate, up = self.to_qkv_mlp_proj(x).split(self.split, dim=-1)
        heads = lambda t: t.unflatten(-1, (self.n_heads, -1))
        attn = joint_attention(self.norm_q(heads(q)), self.norm_k(heads(k)), heads(v), rope)
        return self.to_out(torch.cat([attn, F.silu(gate) * up], dim=-1))


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: Flux2Config):
        super().__init__()
        self.eps = cfg.eps
        self.attn = ParallelAttentionMLP(cfg.dim, cfg.num_attention_heads, cfg.mlp_hidden, cfg.eps)

    def forward(self, x, rope, mod):  # x [B, L + N, dim], mod = one (shift, 1 + scale, gate) set
        shift, scale1, gate = mod
        return torch.addcmul(x, gate, self.attn(modulate(x, shift, scale1, self.eps), rope))


class TimestepMLP(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t [B] (0..1000) -> [B, dim]
        sinusoid = timestep_sinusoid(t, self.channels).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class OutputNorm(nn.Module):
    """The final adaLN; its rows are [scale; shift] (diffusers' order; BFL files store [shift; scale])."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x, temb):  # x [B, N, dim], temb [B, dim]
        scale, shift = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(x, shift, 1 + scale, self.eps)


class Flux2DiT(nn.Module):
    """FLUX.2's MMDiT. forward(x, sigma, cap, cap_mask) -> v = eps - x0.
    With cfg.pixel_head it is the L2P pixel model: p x p RGB patches in through `pixel_embedder` (a name that no
    latent checkpoint has), the last single block's image tokens and the noisy image into the Detailer Head.

    Sequence: [caption tokens (all of them, pads included); image tokens row-major]. Position ids (t, h, w, l):
    caption token j is (0, 0, 0, j), image token (r, c) is (0, r, c, 0). Double-stream blocks keep the two streams'
    weights apart; single-stream blocks run on the joined sequence. cap_mask is accepted for the common interface
    and not used: FLUX.2 attends to every caption position.
    """

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        assert cfg.attention_head_dim == sum(cfg.axes_dims_rope), "head_dim must equal the sum of the RoPE axes"
        if cfg.pixel_head:
            self.pixel_embedder = nn.Linear(p * p * cfg.in_channels, dim, bias=False)  # no bias, as all of FLUX.2
            self.local_decoder = DetailerHead(head_channels(cfg), dim, p, cfg.head_width, cfg.in_channels)
        elif p != 1:
            raise ValueError(f"patch size {p}: the latent FLUX.2 takes one latent position per token (patch 1)")
        else:
            self.x_embedder = nn.Linear(cfg.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim, bias=False)
        # a dict only to keep the published key; klein has no guidance embedder beside it
        self.time_guidance_embed = nn.ModuleDict({"timestep_embedder": TimestepMLP(cfg.timestep_guidance_channels,
                                                                                   dim)})
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        if cfg.single_tail:  # keyed by the first single block that reads it, so that a checkpoint's keys say where
            self.single_stream_modulation_tail = nn.ModuleDict(
                {str(cfg.num_single_layers - cfg.single_tail): Modulation(dim, 1)})
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers))
        if not cfg.pixel_head or cfg.lift_dim:  # the lifted pixel model keeps the source's output layer
            self.norm_out = OutputNorm(dim, cfg.eps)
            self.proj_out = nn.Linear(dim, cfg.lift_dim or cfg.in_channels, bias=False)
        if cfg.lift_dim:
            self.lift = PixelLift(cfg.lift_dim, p * p * cfg.in_channels)
        self.gradient_checkpointing = False

    def transformer(self, tokens: torch.Tensor, grid: tuple[int, int], sigma: torch.Tensor, cap: torch.Tensor,
                    cap_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything between the patch embedder's input and the output layer.

        tokens [B, N, p * p * in_channels] (N = grid h * w, row-major), sigma [B] (1 = noise), cap [B, L,
        joint_attention_dim]. Returns the last single block's image tokens [B, N, dim] (before norm_out) and the
        timestep embedding temb [B, dim].
        """
        B, N, _ = tokens.shape
        embedder = self.pixel_embedder if self.cfg.pixel_head else self.x_embedder
        L, device, dtype = cap.shape[1], tokens.device, embedder.weight.dtype
        h, w = grid
        sigma = sigma.to(device=device, dtype=torch.float32).expand(B)
        temb = self.time_guidance_embed["timestep_embedder"](1000 * sigma)  # [B, dim]
        mod_img, mod_txt = self.double_stream_modulation_img(temb), self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb) * self.cfg.num_single_layers  # one set per single block
        for first, tail in getattr(self, "single_stream_modulation_tail", {}).items():
            mod_single[int(first):] = tail(temb) * (len(mod_single) - int(first))

        ids = torch.zeros(1, L + N, 4, dtype=torch.long, device=device)  # the same for every sample
        ids[0, :L, 3] = torch.arange(L, device=device)
        ids[0, L:, 1] = torch.arange(h, device=device).repeat_interleave(w)
        ids[0, L:, 2] = torch.arange(w, device=device).repeat(h)
        rope = rope_freqs(ids, self.cfg.axes_dims_rope, self.cfg.rope_theta)  # [1, L + N, 1, head_dim / 2]

        img = embedder(tokens.to(dtype))  # [B, N, dim]
        txt = self.context_embedder(cap.to(dtype))  # [B, L, dim]
        for block in self.transformer_blocks:
            img, txt = run_block(self, block, img, txt, rope, mod_img, mod_txt)
        x = torch.cat([txt, img], dim=1)  # [B, L + N, dim]
        for block, mod in zip(self.single_transformer_blocks, mod_single):
            x = run_block(self, block, x, rope, mod)
        return x[:, L:], temb

    def latent_output(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The source's output layer: last single block's image tokens [B, N, dim] -> latent v per token."""
        return self.proj_out(self.norm_out(hidden, temb))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cap: torch.Tensor,
                cap_mask: torch.Tensor | None = None, span_detail: bool = False) -> torch.Tensor:
        """x [B, in_channels, H, W]: the packed latent, or pixels for L2P; sigma [B], cap [B, L, joint_attention_dim]
        (the source's features: every position, its caption length), cap_mask unused -> v = eps - x0 [B, in_channels,
        H, W] fp32: dit_forward."""
        return dit_forward(self, x, sigma, cap, cap_mask, span_detail)



# ----------------------------------------------------------------------------------------------------------------
# 4. L2P head: the pixel model = the Z-Image transformer on p x p RGB patches + a conv U-Net "Detailer Head"
# ----------------------------------------------------------------------------------------------------------------

# Levels of the head, shallow -> deep: (name suffix, channels at head_width 64). One 2x max-pool per level, so the
# bottleneck lands on the token grid: 4 levels at p = 16 (released 1K layout), 6 at p = 64 (released 4K layout); 32
# and 128 follow the same rule (halving channels at each extra shallow level).
DETAILER_LEVELS = (("0a", 8), ("0", 16), ("0b", 32), ("1", 64), ("2", 128), ("3", 256), ("4", 512))


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)


def conv_on_concat(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """conv(cat([a, b], channels)) without building the concatenation: at 4096^2 that would be the head's largest
    tensor (1 GB per image in bf16), and the two half-convolutions sum to the same result."""
    out = F.conv2d(a, conv.weight[:, :a.shape[1]], conv.bias, padding=conv.padding)
    return out.add_(F.conv2d(b, conv.weight[:, a.shape[1]:], None, padding=conv.padding))


class DetailerHead(nn.Module):
    """U-Net over the full-resolution noisy image; the DiT's token map joins at the bottleneck. No timestep input.

    encoder: enc{i} = Conv3x3 + SiLU (skip taken here), then MaxPool 2x, down to H/p
    bottleneck: Conv1x1 (512 + dim -> 512) + SiLU on [pooled features, token map]
    decoder: up{i} = nearest 2x + Conv3x3; dec{i} = Conv3x3 + SiLU on [up, skip]; out_conv 1x1 -> in_channels
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, width: int = 64, out_channels: int | None = None,
                 out_sign: float = 1.0):
        super().__init__()
        self.out_sign = out_sign  # -1 where a published head's out_conv predicts -v (Z-Image's): see forward
        n = int(math.log2(patch_size))
        if 2 ** n != patch_size or not 4 <= n <= len(DETAILER_LEVELS):
            raise ValueError(f"the Detailer Head needs a patch of 16, 32, 64 or 128 pixels, got {patch_size}")
        if width % 8:
            raise ValueError(f"head width {width}: use a multiple of 8")
        self.levels = [(name, c * width // 64) for name, c in DETAILER_LEVELS[-n:]]
        widths = [c for _, c in self.levels]
        for i, (name, width) in enumerate(self.levels):
            self.add_module(f"enc{name}", nn.Sequential(conv3x3(widths[i - 1] if i else in_channels, width), nn.SiLU()))
            self.add_module(f"up{name}", nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                       conv3x3(width, width)))
            self.add_module(f"dec{name}", nn.Sequential(conv3x3(2 * width, widths[max(i - 1, 0)]), nn.SiLU()))
        self.bottleneck = nn.Sequential(nn.Conv2d(widths[-1] + dim, widths[-1], kernel_size=1), nn.SiLU())
        self.out_conv = nn.Conv2d(widths[0], out_channels or in_channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self):
        """He-normal convolutions and zero biases, so that every conv keeps its input's scale; the output conv starts
        at zero, so the prediction starts at 0 whatever the scale of the DiT's tokens. The token map (the prompt, and
        the only source of sigma) enters at the bottleneck, eight convolutions from the output: PyTorch's default
        init shrinks the variance at every conv, so the tokens reached the output far weaker than the noisy image's
        skip path, and training learned to ignore them (bench/RESULTS.md, the prompt effect)."""
        for name, conv in self.named_modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="linear" if name.startswith("up") else "relu")
                nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out_conv.weight)

    def forward(self, x: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] noisy pixels (+ the lifted prediction, sigma: head_input), token_map [B, dim, H/p, W/p] ->
        [B, 3, H, W]: v = eps - x0 in the paper's recipe, x0 with x-prediction, in both families (the Z-Image DiT builds
        its paper-recipe head with out_sign -1: the released out_conv predicts x0 - eps, as its final layer does)."""
        skips = []
        for name, _ in self.levels:
            skips.append(getattr(self, f"enc{name}")(x))
            x = F.max_pool2d(skips[-1], 2)
        x = self.bottleneck(torch.cat([x, token_map], dim=1))
        for (name, _), skip in zip(reversed(self.levels), reversed(skips)):
            dec = getattr(self, f"dec{name}")
            x = dec[1](conv_on_concat(dec[0], getattr(self, f"up{name}")(x), skip))
        return self.out_conv(x) if self.out_sign == 1 else self.out_sign * self.out_conv(x)


X0_MIN_SIGMA = 0.05  # x-prediction's v = (x - x0) / sigma divides by at least this (JiT's clamp)
RECIPES = ("paper", "x0", "embedder", "lift")  # convert.py --recipe; see l2p_config


class PixelLift(nn.Module):
    """The map between p x p RGB patches and the source's latent tokens that lets the converted pixel model sample
    the source's scenes before any training (AsymFlow's construction, arXiv 2605.12964).

    basis [d, p*p*3] has orthonormal rows and `scale` s is fitted so that basis @ patch(x0) ~ s * latent token of
    x0 (convert.py --align-data). Pixel noise projects to exactly unit latent noise, the image to s times its
    latent, so x_sigma scaled by k = 1 / (s + (1 - s) sigma) projects to (1 - sigma') z0 + sigma' eps' with
    sigma' = k sigma: the input and the noise level the source was trained on. Its latent prediction z0 comes back
    to pixels as s * basis^T z0. Kept in fp32 whatever the model's dtype (a bf16 basis is no longer orthonormal).
    """

    def __init__(self, latent_dim: int, patch_dim: int):
        super().__init__()
        self.register_buffer("basis", torch.zeros(latent_dim, patch_dim))
        self.register_buffer("scale", torch.ones(()))

    def dit_input(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k x, k sigma): the noisy image and the noise level the DiT sees."""
        s = self.scale.float()
        k = 1 / (s + (1 - s) * sigma)
        return x * k.view(-1, 1, 1, 1).to(x.dtype), k * sigma

    def to_latent(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, N, p*p*3] -> [B, N, d]
        return tokens.float() @ self.basis.float().T

    def to_pixels(self, latent: torch.Tensor) -> torch.Tensor:  # [B, N, d] -> [B, N, p*p*3]
        return self.scale.float() * (latent.float() @ self.basis.float())

    def source_image(self, image: torch.Tensor, vae: "FluxVAE | Flux2VAE", p: int) -> torch.Tensor:
        """image [B, 3, H, W] with its part inside the subspace replaced by the lift of its latent tokens (the source
        VAE's encoding, one token per p x p patch: area-downsampled to the source's token first, as extend_lift):
        the x0 that the lifted sampler's states move towards when the DiT predicts that latent, so training on
        (1 - sigma) source_image + sigma eps matches what the sampler will feed."""
        token = latent_token_pixels(vae)
        latent = latent_tokens(vae, F.avg_pool2d(image, p // token) if p > token else image)
        lifted = unpatchify(self.to_pixels(latent), p, *image.shape[2:])
        return lifted + image.float() - self.in_subspace(image, p)

    def in_subspace(self, image: torch.Tensor, p: int) -> torch.Tensor:
        """The part of image [B, 3, H, W] (fp32) that the DiT reads: each p x p patch projected onto the basis."""
        basis = self.basis.float()
        return unpatchify(patchify(image.float(), p) @ basis.T @ basis, p, *image.shape[2:])


def head_channels(cfg: "ZImageConfig | Flux2Config") -> int:
    """The Detailer Head's input channels: the noisy image, the lifted prediction (head_lift), sigma (head_sigma)."""
    return cfg.in_channels * (1 + cfg.head_lift) + cfg.head_sigma


def head_input(x: torch.Tensor, lifted: torch.Tensor | None, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """[x, lifted x0 (if given), sigma (if given, as a constant channel)] along the channels, in x's dtype."""
    B, _, H, W = x.shape
    extra = [] if lifted is None else [lifted]
    extra += [] if sigma is None else [sigma.view(B, 1, 1, 1).expand(B, 1, H, W)]
    return torch.cat([x] + [e.to(x.dtype) for e in extra], 1) if extra else x


def check_input(net: "ZImageDiT | Flux2DiT", x: torch.Tensor) -> int:
    """The patch size, after checking x [B, C, H, W] against the model (channels, multiples of the patch)."""
    p, (_, C, H, W) = net.cfg.patch_size, x.shape
    if C != net.cfg.in_channels or H % p or W % p:
        raise ValueError(f"input {tuple(x.shape)}: expected {net.cfg.in_channels} channels and H, W multiples of the "
                         f"patch {p}")
    return p


def dit_forward(net: "ZImageDiT | Flux2DiT", x: torch.Tensor, sigma: torch.Tensor, cap: torch.Tensor,
                cap_mask: torch.Tensor | None, span_detail: bool = False) -> torch.Tensor:
    """Both DiTs' forward: the source's latent through its output layer, or the L2P pixel model (pixel_velocity)."""
    p, (B, C, H, W) = check_input(net, x), x.shape
    if net.cfg.pixel_head:
        return pixel_velocity(net, x, sigma, cap, cap_mask, span_detail)
    hidden, cond = net.transformer(patchify(x, p), (H // p, W // p), sigma, cap, cap_mask)
    return unpatchify(net.latent_output(hidden, cond), p, H, W).float()


def pixel_velocity(net: "ZImageDiT | Flux2DiT", x: torch.Tensor, sigma: torch.Tensor, cap: torch.Tensor,
                   cap_mask: torch.Tensor, span_detail: bool = False) -> torch.Tensor:
    """The L2P pixel model's forward, both families: x [B, 3, H, W] noisy pixels -> v = eps - x0, fp32.

    The DiT's raw last-layer image tokens, as a [B, dim, H/p, W/p] map, and the noisy image (+ sigma, + the lifted
    prediction) go into the Detailer Head. The paper's head predicts v; with x-prediction it predicts x0; the lifted
    model adds the head's output to the source's own prediction lifted to pixels (PixelLift), so a zero head is the
    source. The part of the head's output inside the span the DiT reads (the lift's basis) waits for sigma = 0, the
    last call of model.sample: added earlier, it would enter the sampler's state, and the DiT would read a real
    image's projection instead of the latent it predicted. span_detail=True adds it at every sigma: train.py scores
    the whole decode, so that part keeps learning.
    """
    cfg, p, (B, _, H, W) = net.cfg, net.cfg.patch_size, x.shape
    sigma = sigma.to(device=x.device, dtype=torch.float32).expand(B)
    x_dit, sigma_dit = net.lift.dit_input(x, sigma) if cfg.lift_dim else (x, sigma)
    tokens = patchify(x_dit, p)
    hidden, cond = net.transformer(tokens, (H // p, W // p), sigma_dit, cap, cap_mask)
    lifted = None
    if cfg.lift_dim:
        z0 = net.lift.to_latent(tokens) - sigma_dit.view(B, 1, 1) * net.latent_output(hidden, cond).float()
        lifted = unpatchify(net.lift.to_pixels(z0), p, H, W)
    head_in = head_input(x, lifted if cfg.head_lift else None, sigma if cfg.head_sigma else None)
    tokens = F.layer_norm(hidden, hidden.shape[-1:], eps=1e-6) if cfg.head_token_norm else hidden
    out = net.local_decoder(head_in.to(hidden.dtype), tokens.transpose(1, 2).unflatten(2, (H // p, W // p))).float()
    if not cfg.x_prediction:
        return out
    if lifted is not None:
        out = lifted + out
        if not span_detail:  # see the docstring
            out = out - (sigma > 0).view(B, 1, 1, 1) * net.lift.in_subspace(out - lifted, p)
    return (x.float() - out) / sigma.clamp_min(X0_MIN_SIGMA).view(B, 1, 1, 1)


def latent_token_patch(vae: "FluxVAE | Flux2VAE") -> int:
    """Latent positions per token side: Z-Image's token is 2 x 2 positions of FLUX.1's 16-channel latent, FLUX.2's
    one position of its 128 packed channels (both 16 x 16 pixels: latent_token_patch(vae) * vae.downscale)."""
    return ZIMAGE_LATENT_PATCH if isinstance(vae, FluxVAE) else 1


def latent_token_pixels(vae: "FluxVAE | Flux2VAE") -> int:
    """Pixels per latent token side: SOURCE_TOKEN_PIXELS for both published VAEs (less for tiny test VAEs)."""
    return vae.downscale * latent_token_patch(vae)


def check_vae_fits(vae: "FluxVAE | Flux2VAE", latent_dim: int, flag: str) -> None:
    """A VAE whose latent token is not what the source DiT reads (another family, another latent size) is refused:
    the source samples through its own VAE, and a lift is fitted through and trained against it."""
    per_position = ZIMAGE_LATENT_PATCH ** 2 if isinstance(vae, FluxVAE) else vae.cfg.patch_size[0] ** 2
    if vae.cfg.latent_channels * per_position != latent_dim:
        raise CheckpointError(f"{flag}: its latent tokens hold {vae.cfg.latent_channels * per_position} values, the "
                              f"source DiT reads {latent_dim}: pass the source's own VAE")


def latent_tokens(vae: "FluxVAE | Flux2VAE", images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] -> the source DiT's latent tokens [B, N, d], in the order its patch embedder reads them."""
    return patchify(vae.encode(images), latent_token_patch(vae)).float()


@torch.no_grad()
def fit_lift(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Orthogonal Procrustes with scale, streamed over pairs of pixel patches x [..., P] and latent tokens z [..., d]
    (d <= P; only d x P and P x P sums are kept): basis [d, P] = U V^T from the SVD of sum z x^T, which minimises
    sum ||x - s basis^T z||^2 (the way back to pixels) exactly and sum ||basis x - s z||^2 (the way in) where the
    pixels' spread is even; s = ||basis X|| / ||Z||. Also returns how well it fits: the share of the pixel energy
    inside the subspace, and of the (scaled) latent energy that the projection leaves unexplained."""
    cross = gram = latent_energy = 0
    for x, z in pairs:
        x, z = x.reshape(-1, x.shape[-1]).double(), z.reshape(-1, z.shape[-1]).double()
        cross, gram, latent_energy = cross + z.T @ x, gram + x.T @ x, latent_energy + z.square().sum()
    u, _, vh = torch.linalg.svd(cross, full_matrices=False)
    basis = u @ vh
    projected = (basis @ gram * basis).sum()  # sum ||basis x||^2
    scale = (projected / latent_energy).sqrt()
    residual = projected - 2 * scale * (basis * cross).sum() + scale ** 2 * latent_energy
    fit = {"pixel_energy_in_subspace": float(projected / gram.trace()),
           "latent_energy_unexplained": float(residual / projected)}
    return basis.float(), scale.float(), fit


def extend_lift(basis: torch.Tensor, scale: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A lift fitted on t x t patches (the source's token: 16 x 16 pixels at 1K) -> one for (t factor)^2 patches:
    each pixel of the fit becomes a factor x factor block, i.e. the patch is area-downsampled to t x t first, as
    the DiT keeps its 1K token grid at 2K / 4K. Divided by the factor the rows stay orthonormal (pixel noise still
    projects to unit latent noise) while the image's projection grows by it: scale x factor."""
    d, t = basis.shape[0], math.isqrt(basis.shape[1] // 3)
    blocks = basis.view(d, t, 1, t, 1, 3).expand(d, t, factor, t, factor, 3)
    return blocks.reshape(d, -1) / factor, scale * factor


def l2p_config(source: "ZImageConfig | Flux2Config", patch_size: int = 16, head_width: int = 64,
               recipe: str = "paper", head_sigma: bool = False, head_lift: bool = False, head_token_norm: bool = False):
    """The pixel model made from a latent source: same transformer, RGB patches of p x p, the Detailer Head.

    Recipes: paper (random patch embedder, the head predicts v: the released L2P files), x0 (the same, the head
    predicts x0), embedder (the embedder fitted to the source's latent tokens, the head predicts v), lift (the
    fitted embedder, the source's output layer kept and lifted, the head adds x0 detail to it)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: one of {', '.join(RECIPES)}")
    lift_dim = (ZIMAGE_LATENT_PATCH ** 2 * source.in_channels if source.family == "zimage" else
                source.in_channels) if recipe == "lift" else 0
    if head_lift and not lift_dim:
        raise ValueError("the head can read the lifted prediction only with recipe 'lift'")
    return replace(source, in_channels=3, patch_size=patch_size, pixel_head=True, head_width=head_width,
                   lift_dim=lift_dim, x_prediction=recipe in ("x0", "lift"), head_sigma=head_sigma,
                   head_lift=head_lift, head_token_norm=head_token_norm)


def l2p_fields(shapes: dict[str, tuple[int, ...]], patch_size: int, meta: dict[str, str]) -> dict:
    """The pixel model's recipe fields (config) from its shapes and what its metadata records (l2p_recipe: none is
    the paper's, as in the released files; l2p_head_tokens: norm, else raw; l2p_source_sampler: a lift's source's
    sampler); a lifted model predicts x0 whatever its metadata says."""
    recipe = meta.get("l2p_recipe")
    first_conv = f"local_decoder.enc{DETAILER_LEVELS[-int(math.log2(patch_size))][0]}.0.weight"
    lift_dim, inputs = shapes.get("lift.basis", (0,))[0], shapes[first_conv][1]  # 3 (+ 3 lifted) (+ 1 sigma)
    sampler = json.loads(meta.get("l2p_source_sampler", "[]"))  # [steps, guidance, shift]
    return dict(head_width=shapes["local_decoder.enc1.0.weight"][0], head_sigma=inputs % 3 == 1,
                head_lift=inputs >= 6, lift_dim=lift_dim, x_prediction=bool(lift_dim) or recipe == "x0",
                head_token_norm=meta.get("l2p_head_tokens") == "norm",
                source_sampler=(int(sampler[0]), *map(float, sampler[1:])) if sampler else ())


def new_model(cfg: "ZImageConfig | Flux2Config") -> "ZImageDiT | Flux2DiT":
    return {"zimage": ZImageDiT, "flux2": Flux2DiT}[cfg.family](cfg)


def block_count(cfg: "ZImageConfig | Flux2Config") -> int:
    """The main blocks the freeze policy counts: Z-Image's layers, FLUX.2's double- then single-stream blocks."""
    return cfg.n_layers if cfg.family == "zimage" else cfg.num_layers + cfg.num_single_layers


def set_trainable(model: "ZImageDiT | Flux2DiT", train_blocks: int = 5, strict: bool = False,
                  head_only: bool = False) -> tuple[int, int]:
    """The L2P freeze policy, in one place: the first and last n blocks train, the middle stays frozen. Returns
    (trainable, frozen) parameter counts. head_only: the Detailer Head alone trains (the whole DiT frozen).

    Z-Image, default (the released code): main layers [n, n_layers - n) frozen, everything else in the DiT trains
    (refiners, timestep and caption embedders, pad tokens, patch embedder, head). strict (the paper's wording): only
    the patch embedder, the first and last n layers and the head train.
    FLUX.2: the 5 double- and 20 single-stream blocks count as one stack in execution order (n = 5: all double
    blocks and singles 15-19 train). A modulation shared by several blocks trains only if every block that reads
    it trains (else a frozen block would change): the double-stream ones with all double blocks, the single-stream
    one almost never (a private copy for the tail: cfg.single_tail), the timestep MLP that feeds them all only if
    everything trains. The caption embedder trains, except under strict.
    """
    if model.cfg.family == "zimage":
        stack, always = [f"layers.{i}." for i in range(model.cfg.n_layers)], ["all_x_embedder.", "local_decoder.",
                                                                          "all_final_layer."]
        loose = ["noise_refiner.", "context_refiner.", "t_embedder.", "cap_embedder.", "x_pad_token", "cap_pad_token"]
    else:
        cfg = model.cfg
        singles = [f"single_transformer_blocks.{i}." for i in range(cfg.num_single_layers)]
        stack, always, loose = [f"transformer_blocks.{i}." for i in range(cfg.num_layers)] + singles, \
            ["pixel_embedder.", "local_decoder.", "norm_out.", "proj_out."], ["context_embedder."]
    n = train_blocks
    if not 0 <= 2 * n <= len(stack):
        raise ValueError(f"--train-blocks {n}: needs 0 <= 2n <= {len(stack)} blocks")
    trained = set(stack[:n] + stack[len(stack) - n:])
    if model.cfg.family == "flux2":
        tail_from = cfg.num_single_layers - cfg.single_tail
        readers = {"double_stream_modulation_img.": stack[:cfg.num_layers],
                   "double_stream_modulation_txt.": stack[:cfg.num_layers],
                   "single_stream_modulation.": singles[:tail_from], f"single_stream_modulation_tail.{tail_from}.":
                   singles[tail_from:], "time_guidance_embed.": stack}
        trained |= {shared for shared, blocks in readers.items() if set(blocks) <= trained}
    prefixes = ("local_decoder.",) if head_only else tuple(trained) + tuple(always) + (() if strict else tuple(loose))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


# ----------------------------------------------------------------------------------------------------------------
# 5. VAEs: FLUX.1's AutoencoderKL (Z-Image's) and FLUX.2's; module names follow diffusers so folders load as-is
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FluxVAEConfig:
    # field names are the keys of diffusers' vae/config.json, so config_from_json reads it directly
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159


def vae_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = vae_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = vae_norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):  # [B, c_in, H, W] -> [B, c_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, the channels being the head dimension."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = vae_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.1 is a weightless dropout

    def forward(self, x):  # [B, C, H, W] -> [B, C, H, W]
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))  # [B, HW, C]
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):  # [B, C, H, W] -> [B, C, H/2, W/2]
        # pad right/bottom only (as the original LDM code): an even size then halves exactly
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_resnets))
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_resnets))
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEEncoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1) for i in range(n))
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = vae_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # posterior mean and log-variance

    def forward(self, img):  # [B, in, H, W] -> [B, 2 * latent, H/8, W/8]
        x = self.conv_in(img)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class VAEDecoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)  # latent end first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n))
        self.conv_norm_out = vae_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # [B, latent, h, w] -> [B, out, 8h, 8w]
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class FluxVAE(nn.Module):
    """encode: image in [-1, 1] -> the latent the DiT sees; decode: the inverse (output not clamped)."""

    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode(self, img):  # [B, 3, H, W] -> [B, 16, H/8, W/8]
        H, W = img.shape[-2:]
        if H % self.downscale or W % self.downscale:
            raise ValueError(f"image size {H}x{W} is not a multiple of {self.downscale}; crop or resize it first")
        # the posterior mean, not a sample: FLUX and Z-Image encode deterministically
        mean = self.encoder(img.to(self.encoder.conv_in.weight.dtype))[:, :self.cfg.latent_channels]
        return (mean - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latent):  # [B, 16, h, w] -> [B, 3, 8h, 8w]
        z = latent / self.cfg.scaling_factor + self.cfg.shift_factor  # in the caller's precision, then cast once
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))


@dataclass
class Flux2VAEConfig:
    # field names are the keys of diffusers' vae/config.json (AutoencoderKLFlux2)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)

    @property
    def downscale(self) -> int:  # pixels per DiT token side: the VAE's 8x times the latent patch
        return 2 ** (len(self.block_out_channels) - 1) * self.patch_size[0]


class Flux2VAE(nn.Module):
    """encode: image in [-1, 1] -> the normalised packed latent the DiT sees [B, 4 * latent, H/16, W/16];
    decode: the inverse (output not clamped)."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__()
        if cfg.patch_size[0] != cfg.patch_size[1]:
            raise ValueError(f"latent patch {cfg.patch_size}: only square patches are supported")
        self.cfg = cfg
        c, p = cfg.latent_channels, cfg.patch_size[0]
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)
        # only its running_mean / running_var are used, as fixed statistics (never called, so never updated)
        self.bn = nn.BatchNorm2d(c * p * p, eps=cfg.batch_norm_eps, affine=False)

    @property
    def downscale(self) -> int:
        return self.cfg.downscale

    def _latent_std(self) -> torch.Tensor:
        return (self.bn.running_var + self.cfg.batch_norm_eps).sqrt()[:, None, None]

    def encode(self, img):  # [B, 3, H, W] -> [B, 4 * latent, H/16, W/16]
        H, W = img.shape[-2:]
        if H % self.downscale or W % self.downscale:
            raise ValueError(f"image size {H}x{W} is not a multiple of {self.downscale}; crop or resize it first")
        # the posterior mean, not a sample, as the source encodes
        mean = self.quant_conv(self.encoder(img.to(self.quant_conv.weight.dtype)))[:, :self.cfg.latent_channels]
        z = F.pixel_unshuffle(mean, self.cfg.patch_size[0])  # channel order (c, ph, pw), c slowest
        return (z - self.bn.running_mean[:, None, None]) / self._latent_std()

    def decode(self, latent):  # [B, 4 * latent, h, w] -> [B, 3, 16h, 16w]
        z = latent * self._latent_std() + self.bn.running_mean[:, None, None]  # in the caller's precision
        z = F.pixel_shuffle(z, self.cfg.patch_size[0])  # [B, latent, 2h, 2w]
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))


# ----------------------------------------------------------------------------------------------------------------
# 6. Text encoder (Qwen3-4B through transformers; Z-Image and FLUX.2 read different hidden states)
# ----------------------------------------------------------------------------------------------------------------

# transformers is imported inside the functions below: it takes seconds to import, and most runs (training on cached
# features, sampling after encoding) never touch the text encoder.

# What a config-less single file (ComfyUI's qwen_3_4b.safetensors) is read with, when its shapes do not say otherwise.
QWEN3_4B_DEFAULTS = dict(max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         rms_norm_eps=1e-6, tie_word_embeddings=True)


FLUX2_TEXT_LAYERS = (9, 18, 27)  # hidden_states indices FLUX.2 stacks: outputs of decoder layers 8, 17, 26 of 36



class TextEncoder:
    """encode(prompts) -> (cap [B, L, features], cap_mask [B, L] bool), in one of two recipes:

    zimage: the second-to-last hidden state, L = longest prompt in tokens (<= 512), mask = the real tokens. Same
      features as diffusers' ZImagePipeline._encode_prompt. It pads every prompt to 512 tokens; with right padding
      and causal attention the real tokens never see the pads, so padding to the longest prompt gives the same rows
      for a fraction of the compute.
    flux2: hidden_states[layers] side by side (3 x 2560 = 7680 features), chat template without thinking, always
      L = max_length and an all-True mask: the FLUX.2 DiT attends to every position, and a pad's features depend on
      the prompt (pads attend causally to it), so they are part of the condition. Same as diffusers'
      Flux2KleinPipeline._get_qwen3_prompt_embeds(max_sequence_length=max_length).
    max_length: 512 (both pipelines' default), or the smaller model_max_length a repo's tokenizer_config.json
    declares: the caption length is part of a text recipe, and a toy source trains on a short one.
    """

    def __init__(self, tokenizer, model: "Qwen3Model", family: str = "zimage",
                 layers: tuple[int, ...] = FLUX2_TEXT_LAYERS):
        if family not in ("zimage", "flux2"):
            raise ValueError(f"text recipe {family!r}: expected 'zimage' or 'flux2'")
        if family == "flux2" and max(layers) > len(model.layers):
            raise ValueError(f"hidden states {layers} need {max(layers)} decoder layers; the model has "
                             f"{len(model.layers)}")
        self.tokenizer, self.model, self.family, self.layers = tokenizer, model, family, tuple(layers)
        self.max_length = min(512, tokenizer.model_max_length)
        self.tokenizer.padding_side = "right"  # real tokens first: the rows the DiT and the reference keep

    @torch.no_grad()  # not inference_mode: the features feed DiT training graphs, which must be able to save them
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("this TextEncoder was released; load it again to encode more prompts")
        flux2 = self.family == "flux2"
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=not flux2)
                 for p in prompts]
        batch = self.tokenizer(texts, padding="max_length" if flux2 else "longest", max_length=self.max_length,
                               truncation=True, return_tensors="pt").to(self.device)
        mask = batch.attention_mask.bool()
        if flux2:
            hidden = self.model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False,
                                output_hidden_states=True).hidden_states
            return torch.cat([hidden[k] for k in self.layers], dim=-1), torch.ones_like(mask)
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


def qwen3_config_from_shapes(shapes: dict[str, tuple]) -> "Qwen3Config":
    """The Qwen3 config of a checkpoint without config.json: sizes from tensor shapes, the rest Qwen3-4B's."""
    from transformers import Qwen3Config

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


def qwen3_from_tensors(config: "Qwen3Config", tensors, device="cpu", dtype=torch.bfloat16,
                       n_layers: int | None = None) -> "Qwen3Model":
    """A Qwen3Model of the first `n_layers` decoder layers (default: all but the last, for Z-Image), filled from
    published `model.*` keys.

    Its hidden_states[k], k <= n_layers, are the full model's: only the full model's last hidden state goes through
    the final norm, so the norm is kept only when every layer is. Z-Image reads hidden_states[-2], which is then
    the truncated model's last_hidden_state; FLUX.2 reads up to hidden_states[27] of 36 (1/4 of the compute and
    memory saved).
    """
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    total = config.num_hidden_layers
    n_layers = total - 1 if n_layers is None else n_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"{n_layers} decoder layers requested; this Qwen3 has {total}")
    with torch.device("meta"):
        model = Qwen3Model(config)
    model.layers = model.layers[:n_layers]
    unused = ("lm_head.", *(f"layers.{i}." for i in range(n_layers, total)))  # lm_head is tied to embed_tokens
    if n_layers < total:
        model.norm = nn.Identity()
        unused += ("norm.",)
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
                          "pass the source's repo root, or put its tokenizer/ folder beside the text encoder's file")


def pipeline_family(path) -> str:
    """'flux2' when the repo's model_index.json (at `path`, or beside the component folder or file) names
    Flux2KleinPipeline; else 'zimage'."""
    path = Path(path)
    for folder in (path, path.parent):
        index = folder / "model_index.json"
        if folder.is_dir() and index.exists():
            return "flux2" if read_json(index).get("_class_name") == "Flux2KleinPipeline" else "zimage"
    return "zimage"


def load_text_encoder(path, device="cpu", dtype=torch.bfloat16, tokenizer=None, family: str | None = None,
                      layers: tuple[int, ...] = FLUX2_TEXT_LAYERS) -> TextEncoder:
    """Load from a Z-Image or FLUX.2 [klein] repo root, its text_encoder/ folder, or a single qwen_3_4b.safetensors
    file.

    family: the feature recipe, 'zimage' or 'flux2' (see TextEncoder); by default the repo's model_index.json
    decides, and Z-Image's when there is none. layers: the hidden states the flux2 recipe stacks (tiny test models
    need smaller indices); only the decoder layers they need are loaded.
    The tokenizer comes from `tokenizer` (a folder) if given, else the repo's tokenizer/ folder (a sibling of
    text_encoder/ or of the single file), else the text_encoder folder itself.
    """
    from transformers import AutoTokenizer

    family = family or pipeline_family(path)
    config, files, tok_folder = text_encoder_files(path, tokenizer)
    n_layers = max(layers) if family == "flux2" else None
    model = qwen3_from_tensors(config, read_tensors(files), device=device, dtype=dtype, n_layers=n_layers)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
    except Exception as e:  # transformers and tokenizers raise many kinds for a damaged or missing tokenizer
        raise CheckpointError(f"tokenizer {tok_folder}: cannot be read ({type(e).__name__}: {e})") from None
    return TextEncoder(tokenizer, model, family, layers)


def text_encoder_files(path, tokenizer=None) -> tuple["Qwen3Config", list[Path], Path]:
    """(Qwen3 config, weight files, tokenizer folder) of a repo root, its text_encoder/ folder or a single file,
    from configs and headers alone."""
    from transformers import Qwen3Config

    path = Path(path)
    if path.is_file():
        config = qwen3_config_from_shapes(safetensors_shapes([path]))
        files, tok_folder = [path], _tokenizer_folder(tokenizer, path.parent / "tokenizer")
    elif path.is_dir():
        path = component_dir(path, "text_encoder")
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} holds neither text_encoder/ nor config.json (found "
                                  f"{sorted(p.name for p in path.iterdir())[:8]}); pass the repo root, "
                                  "its text_encoder/ folder or a qwen_3_4b.safetensors file")
        raw = read_json(path / "config.json")
        if raw.get("model_type") != "qwen3":
            kind = raw.get("_class_name") or raw.get("model_type") or "unknown"
            raise CheckpointError(f"{path} is not a Qwen3 text encoder: found {kind} config with keys "
                                  f"{sorted(raw)[:8]}; pass the repo root or its text_encoder/ folder")
        config = Qwen3Config.from_pretrained(path, local_files_only=True)
        files, tok_folder = safetensors_files(path), _tokenizer_folder(tokenizer, path.parent / "tokenizer", path)
    else:
        raise CheckpointError(f"{path} does not exist")
    return config, files, tok_folder


def check_text_encoder(path, cfg: "ZImageConfig | Flux2Config") -> None:
    """CheckpointError (one line) unless the text encoder at `path` makes the caption features a DiT of config `cfg`
    reads: cap_feat_dim wide in its family's recipe (FLUX.2's stacks hidden states up to 27). Both families' real
    encoders are the same Qwen3-4B, so either repo's encoder serves either DiT; a mismatch is a wrong file."""
    config = text_encoder_files(path)[0]
    flux2 = cfg.family == "flux2"
    width = config.hidden_size * (len(FLUX2_TEXT_LAYERS) if flux2 else 1)
    too_shallow = flux2 and config.num_hidden_layers < max(FLUX2_TEXT_LAYERS)
    if width != cfg.cap_feat_dim or too_shallow:
        raise CheckpointError(
            f"text encoder {path}: a Qwen3 of {config.num_hidden_layers} layers x {config.hidden_size} makes "
            f"{width}-wide {'FLUX.2' if flux2 else 'Z-Image'} caption features"
            f"{f' (FLUX.2 reads hidden state {max(FLUX2_TEXT_LAYERS)})' if too_shallow else ''}, but the checkpoint "
            f"reads {cfg.cap_feat_dim}: pass the text encoder of the checkpoint's source repo")


# ----------------------------------------------------------------------------------------------------------------
# 7. Loading: one DiT opener for both families' layouts (rename tables, config from shapes), one VAE loader
# ----------------------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that is not what the caller asked for: says what was seen and what to do."""


def read_json(path: Path) -> dict:
    """A published JSON file (config, index, scheduler); a damaged one is a CheckpointError that names it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): download or repair it") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The shards of a component folder: those named by a *.safetensors.index.json, else every *.safetensors."""
    folder = Path(folder)
    index = min(folder.glob("*.safetensors.index.json"), default=None)
    files = sorted({folder / name for name in read_json(index)["weight_map"].values()} if index else
                   folder.glob("*.safetensors"))
    missing = [f.name for f in files if not f.exists()]
    if missing or not files:
        raise CheckpointError(f"{index} names shards that are not there: {missing[:3]}; download the whole folder "
                              "again" if missing else f"no *.safetensors file in {folder}")
    return files


def assign_weights(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], layout: str,
                   device="cpu", dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Fill a module built on the meta device with checkpoint tensors, each copied once as it streams in (cast to
    `dtype` if floating, None keeps the file's; moved): peak memory is the model plus one tensor, and the model never
    depends on the file. A CheckpointError names the layout and the first missing / unexpected / misshapen keys."""
    expected = module.state_dict()
    state, unexpected, misshapen = {}, [], {}
    for key, tensor in tensors:
        if key not in expected:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            misshapen[key] = f"{key} {tuple(tensor.shape)} != {tuple(expected[key].shape)}"
        else:
            cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            state[key] = tensor.to(device=device, dtype=cast, copy=True)
    missing = [k for k in expected if k not in state and k not in misshapen]
    if missing or unexpected or misshapen:
        raise CheckpointError(
            f"checkpoint read as layout '{layout}' does not fit {type(module).__name__}: "
            f"{len(missing)} missing (first: {missing[:5]}), {len(unexpected)} unexpected (first: {unexpected[:5]}), "
            f"{len(misshapen)} with wrong shape (first: {list(misshapen.values())[:3]}). Is this the right file for "
            "this model?")
    module.load_state_dict(state, strict=True, assign=True)
    for lift in (m for m in module.modules() if isinstance(m, PixelLift)):
        lift.float()
    return module


def config_from_json(cls, path: Path, **overrides):
    """Build a config dataclass from a published config.json, ignoring keys the dataclass does not model."""
    raw = read_json(Path(path))
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names} | overrides)


def component_dir(path: Path, component: str) -> Path:
    """A Hugging Face repo root holds components in subfolders; anything else is taken as the component itself."""
    path = Path(path)
    return path / component if (path / component).is_dir() else path


def renamed(tensors: Iterable[tuple[str, torch.Tensor]], renames: list, fused: list = ()
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in a published format's names -> ours (diffusers'): a key matching a (regex, names) of `fused`
    is split by rows into len(names) parts (a fused qkv), then each (regex, new) of `renames` is applied with re.sub;
    a key renamed to "" is dropped, keys no rule matches pass through (assign_weights names them)."""
    for key, tensor in tensors:
        split = next(((pattern, names) for pattern, names in fused if re.search(pattern, key)), None)
        parts = [(key, tensor)] if split is None else [
            (re.sub(split[0], name, key), part) for name, part in zip(split[1], tensor.chunk(len(split[1])))]
        for key, tensor in parts:
            for pattern, new in renames:
                key = re.sub(pattern, new, key)
            if key:
                yield key, tensor


def count_blocks(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered blocks `prefix`.<i>.* the keys hold."""
    return len({k.removeprefix(prefix + ".").split(".")[0] for k in shapes if k.startswith(prefix + ".")})


def describe_layout(kind: str, names: str, prefix: str) -> str:
    """How a checkpoint was read, for messages: 'single file, BFL names, prefix 'model.diffusion_model.''."""
    return f"{kind}, {names} names" + (f", prefix '{prefix}'" if prefix else "")


def renamed_shapes(shapes: dict[str, tuple[int, ...]], rename: Callable) -> dict[str, tuple[int, ...]]:
    """What `rename` makes of a file's key -> shape, read through meta tensors (no data)."""
    return {k: tuple(t.shape) for k, t in rename((k, torch.empty(s, device="meta")) for k, s in shapes.items())}


# ComfyUI's Z-Image single files: one fused qkv, its own norm and output names, the latent patch's layers unnamed
COMFY_ZIMAGE_FUSED = [(r"\.attention\.qkv\.weight$", tuple(f".attention.to_{n}.weight" for n in "qkv"))]
COMFY_ZIMAGE_NAMES = [(r"^norm_final\.weight$", ""), (r"\.attention\.out\.", ".attention.to_out.0."),
                      (r"\.attention\.([qk])_norm\.", r".attention.norm_\1."),
                      (r"^x_embedder\.", f"all_x_embedder.{ZIMAGE_LATENT_PATCH}-1."),
                      (r"^final_layer\.", f"all_final_layer.{ZIMAGE_LATENT_PATCH}-1.")]

# BFL's FLUX.2 single files (flux-2-klein-4b.safetensors)
BFL_FLUX2_FUSED = [(rf"^double_blocks\.(\d+)\.{stream}_attn\.qkv\.weight$",
                    tuple(rf"transformer_blocks.\1.attn.{n}.weight" for n in names))
                   for stream, names in (("img", ("to_q", "to_k", "to_v")),
                                         ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")))]
BFL_FLUX2_NAMES = [
    (r"^double_blocks\.", "transformer_blocks."),
    (r"\.(img|txt)_attn\.norm\.(query|key)_norm\.scale$",
     lambda m: f".attn.norm_{'added_' if m[1] == 'txt' else ''}{m[2][0]}.weight"),
    (r"\.img_attn\.proj\.", ".attn.to_out.0."), (r"\.txt_attn\.proj\.", ".attn.to_add_out."),
    (r"\.img_mlp\.0\.", ".ff.linear_in."), (r"\.img_mlp\.2\.", ".ff.linear_out."),
    (r"\.txt_mlp\.0\.", ".ff_context.linear_in."), (r"\.txt_mlp\.2\.", ".ff_context.linear_out."),
    (r"^single_blocks\.", "single_transformer_blocks."),  # the double blocks' norms are renamed by now:
    (r"\.norm\.(query|key)_norm\.scale$", lambda m: f".attn.norm_{m[1][0]}.weight"),
    (r"\.linear1\.", ".attn.to_qkv_mlp_proj."), (r"\.linear2\.", ".attn.to_out."),
    (r"^img_in\.", "x_embedder."), (r"^txt_in\.", "context_embedder."),
    (r"^time_in\.in_layer\.", "time_guidance_embed.timestep_embedder.linear_1."),
    (r"^time_in\.out_layer\.", "time_guidance_embed.timestep_embedder.linear_2."),
    (r"_modulation(_img|_txt|)\.lin\.", r"_modulation\1.linear."),
    (r"^final_layer\.linear\.", "proj_out."), (r"^final_layer\.adaLN_modulation\.1\.", "norm_out.linear."),
]


zimage_from_comfy = partial(renamed, renames=COMFY_ZIMAGE_NAMES, fused=COMFY_ZIMAGE_FUSED)


def flux2_from_bfl(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """BFL names -> ours; the final adaLN's halves also swap, BFL's [shift; scale] being diffusers' [scale; shift]."""
    for key, tensor in renamed(tensors, BFL_FLUX2_NAMES, BFL_FLUX2_FUSED):
        if key.startswith("norm_out.linear.") and not tensor.is_meta:  # shapes need no swap (cat on meta is slow)
            tensor = torch.cat(tensor.chunk(2)[::-1])
        yield key, tensor


def zimage_config_from_shapes(shapes: dict[str, tuple[int, ...]], meta: dict | None = None) -> ZImageConfig:
    """A Z-Image (or L2P) config from diffusers-named shapes. The RoPE split is not in the file: Z-Image's
    (32, 48, 48) of 128, scaled for smaller heads."""
    embedder = next(k for k in shapes if re.fullmatch(r"all_x_embedder\.\d+-1\.weight", k))
    patch_size = int(embedder.split(".")[1].split("-")[0])
    pixel_head = any(k.startswith("local_decoder.") for k in shapes)
    dim, cap_feat_dim = shapes["cap_embedder.1.weight"]
    head_dim = shapes["layers.0.attention.norm_q.weight"][0]
    return ZImageConfig(in_channels=shapes[embedder][1] // patch_size ** 2, patch_size=patch_size, dim=dim,
                        n_layers=count_blocks(shapes, "layers"), n_refiner_layers=count_blocks(shapes, "noise_refiner"),
                        n_heads=dim // head_dim, cap_feat_dim=cap_feat_dim, pixel_head=pixel_head,
                        axes_dims=(head_dim // 4, head_dim * 3 // 8, head_dim - head_dim // 4 - head_dim * 3 // 8),
                        **(l2p_fields(shapes, patch_size, meta or {}) if pixel_head else {}))


def flux2_config_from_shapes(shapes: dict[str, tuple[int, ...]], meta: dict | None = None) -> Flux2Config:
    """A FLUX.2 config from diffusers-named shapes. The RoPE split and theta are not in the file: FLUX.2's four equal
    axes and 2000."""
    if "guidance_in.in_layer.weight" in shapes:
        raise CheckpointError("it has a guidance embedder: FLUX.2 [dev], not klein; only klein is supported")
    pixel_head = "pixel_embedder.weight" in shapes  # L2P: in = p * p * 3
    dim, in_channels = shapes["pixel_embedder.weight" if pixel_head else "x_embedder.weight"]
    patch_size = round(math.sqrt(in_channels // 3)) if pixel_head else 1
    head_dim = shapes["single_transformer_blocks.0.attn.norm_q.weight"][0]
    singles = count_blocks(shapes, "single_transformer_blocks")
    tail = [int(k.split(".")[1]) for k in shapes if k.startswith("single_stream_modulation_tail.")]
    return Flux2Config(in_channels=3 if pixel_head else in_channels, patch_size=patch_size,
                       num_layers=count_blocks(shapes, "transformer_blocks"), num_single_layers=singles,
                       num_attention_heads=dim // head_dim, attention_head_dim=head_dim, pixel_head=pixel_head,
                       joint_attention_dim=shapes["context_embedder.weight"][1],
                       timestep_guidance_channels=shapes["time_guidance_embed.timestep_embedder.linear_1.weight"][1],
                       mlp_ratio=shapes["transformer_blocks.0.ff.linear_out.weight"][1] / dim,
                       axes_dims_rope=(head_dim // 4,) * 4, single_tail=singles - tail[0] if tail else 0,
                       **(l2p_fields(shapes, patch_size, meta or {}) if pixel_head else {}))


@dataclass(frozen=True)
class DiTFormat:
    """How one family's transformer checkpoints are told apart and read (see open_checkpoint)."""
    name: str  # for messages: the family, and what its single files can be
    files: str
    class_name: str  # the diffusers class a transformer/config.json must name
    folder_fields: dict  # config.json values outside what this implementation supports are refused
    config: type
    config_from_shapes: Callable  # (diffusers-named shapes, file metadata) -> config
    other_names: str  # the other naming of its single files (ComfyUI's, BFL's): what it is called,
    other_marker: str  # a key part only that naming has,
    from_other_names: Callable  # and the (key, tensor) stream that takes it to ours


DIT_FORMATS = {
    "zimage": DiTFormat("Z-Image", "Z-Image or L2P", "ZImageTransformer2DModel",
                        {"all_patch_size": [2], "all_f_patch_size": [1]}, ZImageConfig, zimage_config_from_shapes,
                        "ComfyUI", ".attention.qkv.", zimage_from_comfy),
    "flux2": DiTFormat("FLUX.2", "FLUX.2", "Flux2Transformer2DModel", {"guidance_embeds": False, "patch_size": 1},
                       Flux2Config, flux2_config_from_shapes, "BFL", "single_stream_modulation.lin.", flux2_from_bfl),
}
COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's and some BFL single files prefix every key with it
TRAINED_FORMAT = "l2p-trained"  # train.py's checkpoints: only the trained tensors, plus where their init is


COMPONENT_MARKERS = [("single_stream_modulation.", "a FLUX.2 transformer"),
                     ("cap_embedder.", "a Z-Image / L2P transformer"),
                     ("bn.running_mean", "FLUX.2's VAE"), ("decoder.mid", "a FLUX.1 / Z-Image VAE"),
                     ("embed_tokens.", "a text encoder")]


def guess_component(keys: Iterable[str]) -> str:
    """What a set of checkpoint keys looks like, for error messages."""
    keys = list(keys)
    return next((what for part, what in COMPONENT_MARKERS if any(part in k for k in keys)), "an unknown checkpoint")


@dataclass
class DiTCheckpoint:
    """A DiT checkpoint on disk, of either family: its config, which layout it is in, and its tensors under our
    (diffusers) names, `rename` taking a single file's own names there (ComfyUI's, BFL's). `trained` (train.py
    output) overrides the tensors of the same names in `files` (the init)."""
    cfg: "ZImageConfig | Flux2Config"
    layout: str
    files: list[Path]
    strip_prefix: str = ""
    rename: Callable | None = None
    trained: Path | None = None

    def tensors(self, meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        tensors = read_tensors(self.files, self.strip_prefix, meta=meta)
        replaced = set(safetensors_shapes([self.trained])) if self.trained else set()
        yield from ((k, t) for k, t in (self.rename(tensors) if self.rename else tensors) if k not in replaced)
        yield from read_tensors([self.trained], meta=meta) if self.trained else ()


def trained_metadata(init: Path, trained: Path) -> dict[str, str]:
    """What a train.py checkpoint records of its init: the path relative to the checkpoint's folder (a run folder
    moved together with its init still loads) and the init's header fingerprint (a stand-in init is refused)."""
    return {"format": TRAINED_FORMAT, "init": os.path.relpath(Path(init).resolve(), Path(trained).resolve().parent),
            "init_header_sha256": header_sha256(init)}


def trained_init_path(path: Path, init: Path | None = None) -> Path | None:
    """For a train.py checkpoint (only the trained tensors), the init checkpoint it completes: `init` if given, else
    the recorded path (relative to the checkpoint's folder). None for any other checkpoint."""
    meta = safetensors_metadata(path)
    if meta.get("format") != TRAINED_FORMAT:
        return None
    recorded = path.parent / meta["init"]  # an absolute recorded path (older runs) stays absolute
    init = Path(init) if init is not None else recorded
    if not init.exists():
        raise CheckpointError(f"{path} holds only the trained tensors of a run; its init {recorded} is not there. "
                              "Pass the checkpoint the run started from (--init), or put it back at that path")
    expected = meta.get("init_header_sha256")
    if expected and header_sha256(init) != expected:
        raise CheckpointError(f"{init} is not the init that {path} was trained from (its header differs); pass the "
                              "convert.py output the run started from")
    return init


def open_checkpoint(path, init: Path | None = None, family: str | None = None) -> DiTCheckpoint:
    """A Z-Image, L2P or FLUX.2 transformer checkpoint, family and layout detected, no tensor read: a repo root, a
    transformer/ folder (one file or shards), or a single file in diffusers names or the family's other naming
    (ComfyUI's, BFL's), optionally prefixed 'model.diffusion_model.', its config from its shapes. A train.py
    checkpoint is completed by its init (`init`, or the path it recorded). family: insist on 'zimage' or 'flux2'."""
    path = Path(path)
    if path.is_dir():
        folder = component_dir(path, "transformer")
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{path} is neither a {DIT_FORMATS[family or 'zimage'].name} repo root (with "
                                  "transformer/) nor a component folder (config.json + safetensors); pass one of "
                                  "those or a single .safetensors file")
        raw = read_json(folder / "config.json")
        fmt = DIT_FORMATS[family or next((f for f, d in DIT_FORMATS.items() if d.class_name == raw.get("_class_name")),
                                         "zimage")]
        if raw.get("_class_name", fmt.class_name) != fmt.class_name:
            raise CheckpointError(f"{folder}/config.json describes a {raw['_class_name']}, not a {fmt.name} "
                                  f"transformer ({fmt.class_name}); pass the {fmt.name} repo root or its "
                                  "transformer/ folder")
        implemented = fmt.folder_fields | {"out_channels": raw.get("in_channels")}
        unsupported = {k: raw[k] for k, ok in implemented.items() if raw.get(k, ok) not in (ok, None)}
        if unsupported:
            raise CheckpointError(f"{folder}/config.json: {unsupported} is not an architecture this {fmt.name} "
                                  "transformer implements")
        return DiTCheckpoint(config_from_json(fmt.config, folder / "config.json"), "diffusers folder",
                             safetensors_files(folder))
    if not path.is_file() or path.suffix != ".safetensors":
        raise CheckpointError(f"{path} does not exist" if not path.exists() else
                              f"{path}: expected a folder or a .safetensors file")
    trained_from = trained_init_path(path, init)
    if trained_from is not None:
        base = open_checkpoint(trained_from, family=family)
        return replace(base, layout=f"{base.layout} + trained tensors of {path.name}", trained=path)
    shapes = safetensors_shapes([path])
    strip = COMFY_PREFIX if shapes and all(k.startswith(COMFY_PREFIX) for k in shapes) else ""
    shapes = {k.removeprefix(strip): s for k, s in shapes.items()}
    family = family or ("flux2" if any(k.startswith("single_stream_modulation") for k in shapes) else "zimage")
    fmt = DIT_FORMATS[family]
    other = any(fmt.other_marker in k for k in shapes)
    names = renamed_shapes(shapes, fmt.from_other_names) if other else shapes
    pixel = any(k.startswith("local_decoder.") for k in names)
    layout = describe_layout("L2P pixel checkpoint" if pixel else "single file",
                             fmt.other_names if other else "diffusers", strip)
    try:
        cfg = fmt.config_from_shapes(names, safetensors_metadata(path))
    except (KeyError, StopIteration):
        raise CheckpointError(f"{path} (read as {layout}) is not a {fmt.files} transformer: it looks like "
                              f"{guess_component(shapes)} ({len(shapes)} keys, first: {list(shapes)[:4]}). Pass a "
                              f"{fmt.name} repo root, its transformer/ folder or a single file") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path} ({layout}): {e}") from None
    return DiTCheckpoint(cfg, layout, [path], strip, fmt.from_other_names if other else None)


def load_model(path, device="cpu", dtype: torch.dtype = torch.bfloat16, init: Path | None = None
               ) -> "ZImageDiT | Flux2DiT":
    """A Z-Image DiT, an L2P pixel model or a FLUX.2 DiT (forward(x, sigma, cap, cap_mask) -> v) from anything
    open_checkpoint reads, built on meta and filled tensor by tensor, in `dtype` (the released L2P files mix dtypes)."""
    checkpoint = open_checkpoint(path, init)
    with torch.device("meta"):
        model = new_model(checkpoint.cfg)
    return assign_weights(model, checkpoint.tensors(), checkpoint.layout, device=device, dtype=dtype).eval()


# The LDM names of FLUX.1's and FLUX.2's ae.safetensors -> ours (diffusers'); BFL keeps FLUX.2's 1x1 quant convs
# inside the encoder and decoder, diffusers at the top.
LDM_VAE_NAMES = [
    (r"\.norm_out\.", ".conv_norm_out."), (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"^encoder\.quant_conv\.", "quant_conv."), (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
]


def vae_from_ldm(tensors: Iterable[tuple[str, torch.Tensor]], levels: int = 4) -> Iterator[tuple[str, torch.Tensor]]:
    """(LDM key, tensor) -> ours, prefix already stripped; `levels` = len(block_out_channels): LDM numbers decoder
    levels from the image end, diffusers from the latent end."""
    up = lambda m: f".up_blocks.{levels - 1 - int(m[1])}.{'resnets' if m[2] == 'block' else 'upsamplers.0'}."
    for key, tensor in renamed(tensors, LDM_VAE_NAMES + [(r"\.up\.(\d+)\.(block|upsample)\.", up)]):
        yield key, tensor.flatten(1) if ".attentions.0.to_" in key and tensor.ndim == 4 else tensor  # 1x1 convs


def flux_vae_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> FluxVAEConfig:
    """The architecture of a config-less FLUX.1 VAE file (diffusers names) from its shapes. GroupNorm's group count
    is not in the shapes: every published LDM VAE uses 32. The latent normalisation is not either: FLUX.1's."""
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks."))
    channels = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels))
    if any(c % 32 for c in channels):
        raise CheckpointError(f"a VAE with channels {channels} cannot use 32 GroupNorm groups; put its config.json "
                              "beside it (a diffusers vae/ folder) or pass load_vae(config=...)")
    return FluxVAEConfig(in_channels=shapes["encoder.conv_in.weight"][1],
                         out_channels=shapes["decoder.conv_out.weight"][0],
                         latent_channels=shapes["decoder.conv_in.weight"][1], block_out_channels=channels,
                         layers_per_block=count_blocks(shapes, "encoder.down_blocks.0.resnets"))


# Per family: the diffusers class of its vae/ folder, the modules, and the config.json values they implement
VAE_FORMATS = {"zimage": ("FLUX.1", "AutoencoderKL", FluxVAE, FluxVAEConfig, {}),
               "flux2": ("FLUX.2", "AutoencoderKLFlux2", Flux2VAE, Flux2VAEConfig,
                         {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
                          "act_fn": "silu"})}


def load_vae(path, device="cpu", dtype=torch.float32, config=None, family: str | None = None
             ) -> "FluxVAE | Flux2VAE":
    """FLUX.1's autoencoder (Z-Image's) or FLUX.2's, from a repo root (with vae/), a diffusers vae folder (config.json
    + one file or shards), or one .safetensors file in diffusers or LDM / BFL (ae.safetensors) names, optionally
    prefixed 'first_stage_model.' or 'vae.'. family: 'zimage' or 'flux2' insists on one; by default the config.json's
    class, else bn statistics in the tensors (FLUX.2's latent normalisation), decide. config: by default the
    config.json; without one, FLUX.1's is read from the shapes and FLUX.2's is klein's. bn.num_batches_tracked (a
    count of training batches) is not read. device="meta" reads the headers alone (the architecture, no weights)."""
    path = component_dir(path, "vae")
    if not (path.is_dir() or path.suffix == ".safetensors" and path.is_file()):
        raise CheckpointError(f"{path}: expected a repo root, a vae folder or an existing .safetensors file")
    config_file = path / "config.json"
    raw = read_json(config_file) if config_file.exists() else None
    files = safetensors_files(path) if path.is_dir() else [path]
    shapes = safetensors_shapes(files)
    family = family or ("flux2" if (raw.get("_class_name") == "AutoencoderKLFlux2" if raw else
                                    any(k.endswith("bn.running_mean") for k in shapes)) else "zimage")
    name, class_name, cls, config_cls, implemented = VAE_FORMATS[family]
    if raw is not None and raw.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"{config_file} describes a {raw['_class_name']}, not {name}'s {class_name}")
    implemented = implemented | {"decoder_block_out_channels": (raw or {}).get("block_out_channels")}
    unsupported = {k: raw[k] for k, ok in implemented.items() if raw and raw.get(k, ok) not in (ok, None)}
    if unsupported:
        raise CheckpointError(f"{config_file}: {unsupported} is not an architecture this VAE implements")
    prefix = next((p for p in ("", "first_stage_model.", "vae.") if f"{p}decoder.conv_in.weight" in shapes), None)
    if prefix is None:
        raise CheckpointError(f"not a VAE checkpoint: none of its {len(shapes)} tensors is a VAE decoder's (first "
                              f"keys: {sorted(shapes)[:3]}). Pass the repo root, its vae/ folder, or ae.safetensors")
    ldm = f"{prefix}decoder.mid.block_1.conv1.weight" in shapes
    layout = describe_layout("folder" if path.is_dir() else "single file",
                             ("BFL" if family == "flux2" else "LDM") if ldm else "diffusers", prefix)
    names = {k.removeprefix(prefix): s for k, s in shapes.items()}
    levels = 1 + max(int(k.split(".")[2]) for k in names if k.startswith(("encoder.down.", "encoder.down_blocks.")))
    tensors = read_tensors(files, strip_prefix=prefix, meta=torch.device(device).type == "meta")
    tensors = vae_from_ldm(tensors, levels) if ldm else tensors
    if family == "flux2":
        if "bn.running_mean" not in names:
            raise CheckpointError(f"{path} ({layout}) has no bn.running_mean: it looks like {guess_component(shapes)}, "
                                  "not FLUX.2's VAE")
        tensors = chain(((k, t) for k, t in tensors if k != "bn.num_batches_tracked"),
                        [("bn.num_batches_tracked", torch.tensor(0))])
    if config is None and raw is not None:
        config = config_from_json(config_cls, config_file)
    elif config is None:
        names = renamed_shapes(names, partial(vae_from_ldm, levels=levels)) if ldm else names
        config = Flux2VAEConfig() if family == "flux2" else flux_vae_config_from_shapes(names)
    with torch.device("meta"):
        vae = cls(config)
    return assign_weights(vae, tensors, layout, device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------------------
# 8. Sampling
# ----------------------------------------------------------------------------------------------------------------


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The static shift s*σ / (1 + (s-1)*σ): s > 1 spends more of the steps (or training draws) at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """[steps + 1] fp32: linspace(1, 1/steps, steps) under shift_sigma, then a final 0."""
    sigmas = shift_sigma(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def noise_for_seeds(seeds: list[int], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """[len(seeds), *shape] fp32 N(0, I); each sample's noise depends on its own seed only, not on its batch."""
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def cat_captions(caps: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate caption batches of different lengths along the batch, padding with masked zero rows."""
    L = max(c.shape[1] for c in caps)
    cap = torch.cat([F.pad(c, (0, 0, 0, L - c.shape[1])) for c in caps])
    mask = torch.cat([F.pad(m, (0, L - m.shape[1]), value=False) for m in masks])
    return cap, mask


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, cap: torch.Tensor, cap_mask: torch.Tensor, steps: int,
           shift: float, guidance: float = 1.0, neg_cap: torch.Tensor | None = None,
           neg_mask: torch.Tensor | None = None, cfg_batch: bool = True, progress: bool = False) -> torch.Tensor:
    """Euler from sigma = 1 to 0 on any model with forward(x, sigma, cap, cap_mask) -> v; returns x0 (fp32).

    Classifier-free guidance is v = v_neg + guidance * (v_pos - v_neg): 1 = off. Z-Image writes its CFG as
    pos + w * (pos - neg), which is guidance = 1 + w. cfg_batch runs both branches as one batch of 2B;
    False runs two passes (less memory). A lifted pixel model (cfg.lift_dim) gets one more call, at sigma = 0 on the
    final state: its x0 there, the only one with the head's detail inside the lift's subspace (pixel_velocity).
    """
    guided = guidance != 1.0
    if guided and neg_cap is None:
        raise ValueError("guidance != 1 needs the negative prompt's features (neg_cap, neg_mask)")
    dtype = next(model.parameters()).dtype
    x = noise.float()
    B = x.shape[0]
    sigmas = shifted_sigmas(steps, shift).to(x.device)
    if guided and cfg_batch:
        both_cap, both_mask = cat_captions([cap, neg_cap], [cap_mask, neg_mask])

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not guided:
            return model(x.to(dtype), sigma, cap, cap_mask).float()
        if cfg_batch:
            v_pos, v_neg = model(x.to(dtype).repeat(2, 1, 1, 1), sigma.repeat(2), both_cap, both_mask).chunk(2)
        else:
            v_pos, v_neg = model(x.to(dtype), sigma, cap, cap_mask), model(x.to(dtype), sigma, neg_cap, neg_mask)
        return (v_neg + guidance * (v_pos - v_neg)).float()

    cfg = getattr(model, "cfg", None)
    for i in tqdm(range(steps), desc="sampling", unit="step", disable=not progress):
        v = velocity(x, sigmas[i].expand(B))
        if i == steps - 1 and getattr(cfg, "x_prediction", False):  # v = (x - x0) / sigma of the x it read (bf16 on
            x = x.to(dtype).float()  # CUDA): the step to sigma 0 lands on its x0, not x0 plus that rounding of x
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    if getattr(cfg, "lift_dim", 0):  # at sigma 0 its v is (x - x0) / X0_MIN_SIGMA
        x = x.to(dtype).float() - X0_MIN_SIGMA * velocity(x, sigmas[-1].expand(B))
    return x


@torch.no_grad()
def generate(model: "ZImageDiT | Flux2DiT", cap: torch.Tensor, cap_mask: torch.Tensor, seeds: list[int], height: int,
             width: int, steps: int, shift: float, guidance: float = 1.0, neg_cap: torch.Tensor | None = None,
             neg_mask: torch.Tensor | None = None, vae: "FluxVAE | Flux2VAE | None" = None, cfg_batch: bool = True,
             progress: bool = False) -> torch.Tensor:
    """Prompt features -> images [B, 3, height, width] in [-1, 1] (fp32, unclamped), one seed per image.

    A latent model (Z-Image, FLUX.2) needs its `vae`: noise is drawn in its latent space [in_channels, H/d, W/d],
    d = vae.downscale (8 for FLUX.1's VAE, 16 for FLUX.2's, patchify included), and the result decoded; the L2P
    pixel model draws its noise in pixels and needs no VAE.
    """
    if model.cfg.pixel_head == (vae is not None):
        raise ValueError("a latent model needs its VAE to make images; a pixel model takes none")
    scale = 1 if vae is None else vae.downscale
    multiple = scale * model.cfg.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"{width}x{height}: width and height must be multiples of {multiple} for this model "
                         f"({'pixel patch' if scale == 1 else f'VAE x{scale} times latent patch'} {multiple})")
    device = next(model.parameters()).device
    noise = noise_for_seeds(seeds, (model.cfg.in_channels, height // scale, width // scale), device)
    x = sample(model, noise, cap.to(device), cap_mask.to(device), steps, shift, guidance,
               None if neg_cap is None else neg_cap.to(device), None if neg_mask is None else neg_mask.to(device),
               cfg_batch=cfg_batch, progress=progress)
    if vae is None:
        return x
    vae_dtype = next(vae.parameters()).dtype
    return vae.decode(x.to(vae_dtype)).float()


def check_finite_images(images: torch.Tensor, settings: str) -> None:
    """sample.py and synth.py write no image that sampling made non-finite (it would be a black PNG)."""
    if not torch.isfinite(images).all():
        raise CheckpointError(f"sampling gave non-finite values (NaN or inf) with {settings}: a checkpoint with "
                              "non-finite weights, or a guidance or shift far too large")


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent time shift mu (sigma grid: shifted_sigmas(steps, exp(mu))).

    mu is linear in the token count, along two fitted lines for 10 and 200 steps; past 4300 tokens the 200-step
    line alone, below it the step count interpolates (and extrapolates) between the two.
    """
    mu_200 = 1.6927e-4 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = 8.73809524e-5 * image_seq_len + 1.89833333
    return float(mu_10 + (mu_200 - mu_10) * (num_steps - 10) / 190)


def flux2_sampler_settings(repo, height: int, width: int, steps: int | None = None,
                           distilled: bool | None = None) -> dict:
    """FLUX.2 [klein]'s own sampler for a height x width image: steps, shift, guidance (for sample / generate).

    distilled (default: <repo>/model_index.json's is_distilled): klein-4B, 4 steps, CFG off; klein-base-4B:
    50 steps, guidance 4.0 as v = v_neg + 4 (v_pos - v_neg), the negative prompt "". shift = exp(mu) for the
    image's token count (16 x 16 pixels per token, or the repo's vae/config.json's downscale) and the step count.
    """
    if distilled is None:
        index = Path(repo) / "model_index.json"
        if not index.exists():
            raise CheckpointError(f"{repo} has no model_index.json: pass the FLUX.2 [klein] repo root, or distilled=")
        distilled = bool(read_json(index).get("is_distilled", False))
    steps = steps or (4 if distilled else 50)
    vae_config = Path(repo) / "vae" / "config.json"
    d = config_from_json(Flux2VAEConfig, vae_config).downscale if vae_config.exists() else Flux2VAEConfig().downscale
    mu = compute_empirical_mu((height // d) * (width // d), steps)
    return {"steps": steps, "shift": math.exp(mu), "guidance": 1.0 if distilled else 4.0}


def source_sampler_settings(repo, height: int = 1024, width: int = 1024, steps: int | None = None) -> dict:
    """The source LDM's own sampler (steps, shift, guidance as in sample()) for a height x width image. Z-Image, from
    its scheduler_config.json: Turbo (shift 3) 8 steps, CFG off; base (shift 6) 50 steps, CFG w = 4, i.e. guidance
    1 + w. FLUX.2 [klein], from model_index.json: see flux2_sampler_settings."""
    if pipeline_family(repo) == "flux2":
        return flux2_sampler_settings(repo, height, width, steps)
    config = Path(repo) / "scheduler" / "scheduler_config.json"
    if not config.exists():
        raise CheckpointError(f"{repo} has no scheduler/scheduler_config.json: pass the Z-Image repo root")
    shift = float(read_json(config).get("shift", 3.0))
    turbo = shift <= 3.0
    return {"steps": steps or (8 if turbo else 50), "shift": shift, "guidance": 1.0 if turbo else 5.0}


def pixel_shift(cfg: "ZImageConfig | Flux2Config", tokens: int, steps: int) -> float:
    """The pixel model's default sigma shift (sample.py, train.py): 3, or FLUX.2 [klein]'s exp(mu) for the token
    count, or a lift's source's static shift (Z-Image base: 6). A lift extended to patches of p > 16 pixels (2K, 4K)
    multiplies it by p / 16: the image's projection grows by that factor (extend_lift), the noise's does not, and
    this shift gives its DiT the noise levels of 1K. (The extension's factor is p / the source's token, 16 pixels
    for both published sources; tiny test VAEs differ.)"""
    shift = math.exp(compute_empirical_mu(tokens, steps)) if cfg.family == "flux2" else 3.0
    shift = cfg.source_sampler[2] if cfg.source_sampler and cfg.source_sampler[2] else shift
    return shift * (cfg.patch_size / SOURCE_TOKEN_PIXELS if cfg.lift_dim else 1)


def pixel_sampler(cfg: "ZImageConfig | Flux2Config", tokens: int, steps: int | None = None
                  ) -> tuple[int, float, float]:
    """A pixel model's default sampler (sample.py, train.py's sample grids): steps (unless given), CFG and shift. A
    lift: its source's sampler; else the released L2P's, 30 steps with CFG 2.0 at patch 16, 50 with 4.0 at patch 64
    and for FLUX.2 (klein-base's). The shift is pixel_shift's for those steps."""
    released = (50, 4.0) if cfg.patch_size >= 64 or cfg.family == "flux2" else (30, 2.0)
    default_steps, guidance = cfg.source_sampler[:2] if cfg.source_sampler else released
    steps = steps or default_steps
    return steps, guidance, pixel_shift(cfg, tokens, steps)


# ----------------------------------------------------------------------------------------------------------------
# 9. I/O and processes: what several scripts share
# ----------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, data: "bytes | Callable[[BinaryIO], object]") -> None:
    """Write bytes, or whatever data(file) writes, to `path` atomically: a per-process temp file beside it, fsync,
    rename. A killed writer leaves at most a dot-file that nothing trusts, never a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@contextmanager
def open_safetensors(file: Path):
    """safetensors' own reader, with a file that is missing, truncated or not safetensors as a CheckpointError."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist") from None
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); download or write it again") from None


def safetensors_metadata(file: Path) -> dict[str, str]:
    with open_safetensors(file) as f:
        return f.metadata() or {}


def safetensors_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the files, from the headers alone."""
    return {k: tuple(t.shape) for k, t in read_tensors(files, meta=True)}


def read_tensors(files: Iterable[Path], strip_prefix: str = "", meta: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, tensor) one at a time, memory-mapped (copy what you keep); meta=True reads headers only. Each
    tensor gets a mapping of its own, closed once the caller moves on, so the pages of tensors already consumed leave
    the resident set: a checkpoint streams into a bf16 model without a second copy in memory."""
    for file in files:
        with open_safetensors(file) as f:
            specs = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
        for key, (dtype, shape) in specs.items():
            if meta:
                tensor = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")
            else:
                with open_safetensors(file) as f:
                    tensor = f.get_tensor(key)
            yield key.removeprefix(strip_prefix), tensor


def header_sha256(file: Path) -> str:
    """A fingerprint of a .safetensors file read from its header alone (names, dtypes, shapes, offsets, metadata)."""
    with open(file, "rb") as f:
        return hashlib.sha256(f.read(8 + int.from_bytes(f.read(8), "little"))).hexdigest()


def weights_sha256(module: nn.Module) -> str:
    """A fingerprint of a module's weights by content (two fine-tunes of one architecture share a file header)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                      specs: dict[str, torch.Tensor] | None = None) -> None:
    """Write a .safetensors file atomically (temp file + rename), streaming: one tensor in memory at a time.

    The header comes first in the format, so a streamed write needs `specs` (key -> a meta tensor with the dtype
    and shape, in the order `tensors` will yield them); without specs, `tensors` is a dict and is its own spec.
    """
    if specs is None:
        specs = dict(tensors)
        tensors = specs.items()
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for key, spec in specs.items():
        size = spec.numel() * spec.element_size()
        header[key] = {"dtype": names[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    def write(f):
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        order = iter(specs.items())
        for key, tensor in tensors:
            expected_key, spec = next(order, (None, None))
            if key != expected_key or tensor.dtype != spec.dtype or tensor.shape != spec.shape:
                raise ValueError(f"tensor {key} {tensor.dtype} {tuple(tensor.shape)} does not follow the header "
                                 f"({expected_key})")
            f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
        if next(order, None) is not None:
            raise ValueError(f"{path}: fewer tensors than the header announced")

    atomic_write(path, write)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounded as diffusers' image processor does."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(path: Path, pixels: np.ndarray, text: dict | None = None) -> None:
    """An 8-bit RGB PNG, written atomically; `text` goes into PNG text chunks (prompt, seed, settings...)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG", pnginfo=info))


def image_grid(images, columns: int, gap: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3] (or a list of them, same size) -> one image, row by row, `gap` white pixels apart."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = image
    return grid


# The caption-feature cache that synth.py writes and train.py reads (and writes for captions that come without):
# features/<hash of the prompt>.safetensors holding "cap" [L, D] bf16, the text encoder's rows that the DiT sees,
# with the prompt in the metadata so that a file is only ever used for the prompt it was made from.
def caption_features_path(folder: Path, prompt: str) -> Path:
    return Path(folder) / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.safetensors"


def write_caption_features(path: Path, cap: torch.Tensor, prompt: str) -> None:
    write_safetensors(path, {"cap": cap.detach().to("cpu", torch.bfloat16).contiguous()}, {"prompt": prompt})


def read_caption_features(path: Path, prompt: str | None = None) -> torch.Tensor | None:
    """"cap" [L, D] of a cache file, or None if it is missing, unreadable, empty or (given `prompt`) another's."""
    try:
        with open_safetensors(path) as f:
            if prompt is not None and (f.metadata() or {}).get("prompt") != prompt:
                return None
            cap = f.get_tensor("cap").clone()
    except (CheckpointError, SafetensorError):  # torn, not safetensors, or no "cap": not a usable cache entry
        return None
    return cap if cap.ndim == 2 and len(cap) else None


def encode_to_cache(text_encoder, prompts: list[str], folder: Path | None, device, dtype: torch.dtype,
                    progress: bool = False, family: str | None = None) -> dict[str, torch.Tensor]:
    """prompt -> its caption features, bf16 on the CPU, each prompt encoded on its own (so its rows never depend on
    batch companions) and, with `folder`, written to the cache there (FLUX.2's: every position of its caption
    length). The text encoder is freed at the end: the DiT needs the memory next."""
    encoder, features = load_text_encoder(text_encoder, device=device, dtype=dtype, family=family), {}
    for prompt in tqdm(prompts, desc="encoding prompts", unit="prompt", disable=not progress):
        cap, mask = encoder.encode([prompt])
        features[prompt] = cap[0, mask[0]].to("cpu", torch.bfloat16)
        if folder is not None:
            write_caption_features(caption_features_path(folder, prompt), features[prompt], prompt)
    encoder.release()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return features


CAPTION_FIELDS = ("prompt", "text", "caption")


@dataclass
class Record:
    """One training sample on disk; a tar member is `image` (the shard) at byte `offset`, `size` bytes long."""
    image: str
    caption: str
    features: str | None = None  # the caption-feature cache file (model.caption_features_path)
    offset: int = 0
    size: int = -1
    name: str = ""  # how the log names it


def records_from_metadata(folder: Path) -> list[Record]:
    """synth.py output or a DiffSynth-style folder: metadata.jsonl (preferred) or metadata.csv, paths relative to it."""
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    rows = []
    if jsonl.exists():
        for i, line in enumerate(jsonl.read_text().splitlines()):
            try:
                rows += [(f"{jsonl}:{i + 1}", json.loads(line))] if line.strip() else []
            except json.JSONDecodeError as e:
                raise SystemExit(f"{jsonl}:{i + 1} is not JSON ({e}); fix or remove that line") from None
    else:
        with open(table, newline="") as f:
            rows = [(f"{table}:{i + 2}", row) for i, row in enumerate(csv.DictReader(f))]
    records = []
    for where, row in rows:
        image = row.get("file_name") or row.get("image")
        caption = next((str(row[f]) for f in CAPTION_FIELDS if row.get(f) not in (None, "")), None)
        if not image or caption is None:
            raise SystemExit(f"{where}: no image file or no caption (the row has {sorted(row)}); each row needs "
                             "file_name or image, and prompt, text or caption")
        features = row.get("features") and str(folder / row["features"])
        records.append(Record(str(folder / image), caption, features, name=image))
    return records


def iter_members(tar: tarfile.TarFile, shard: Path) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tar
    except tarfile.ReadError as e:
        raise SystemExit(f"{shard}: the tar ends early or is damaged ({e}); repair or remove the shard") from None


def records_from_shards(shards: list[Path]) -> list[Record]:
    """Webdataset tar shards: members sharing a key (path up to the first dot of the file name) form a sample, an
    image and a caption (.txt, or .json with prompt/caption/text). Images are read in place later, by offset."""
    records, incomplete = [], 0
    for shard in shards:
        try:
            tar = tarfile.open(shard, "r:")  # uncompressed only: members are then read by offset, in any order
        except tarfile.ReadError as e:
            raise SystemExit(f"{shard}: not an uncompressed tar ({e}); webdataset shards are plain .tar") from None
        samples: dict[str, dict] = {}
        with tar:
            for member in (m for m in iter_members(tar, shard) if m.isfile()):
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                sample = samples.setdefault(member.name.rpartition("/")[0] + "/" + key, {})
                if ext.lower() in ("jpg", "jpeg", "png", "webp"):
                    sample["image"] = member
                elif ext.lower() in ("txt", "json"):
                    try:
                        text = tar.extractfile(member).read().decode("utf-8")
                        meta = json.loads(text) if ext.lower() == "json" else {"caption": text.strip()}
                    except (ValueError, tarfile.ReadError) as e:  # JSON and UTF-8 errors are ValueErrors
                        raise SystemExit(f"{shard}: cannot read {member.name} ({e}); repair or remove it") from None
                    sample["caption"] = next((str(meta[f]) for f in CAPTION_FIELDS if meta.get(f)), None)
        for sample in samples.values():
            if sample.get("image") is None or not sample.get("caption"):
                incomplete += 1
                continue
            member = sample["image"]
            records.append(Record(str(shard), sample["caption"], offset=member.offset_data, size=member.size,
                                  name=f"{shard.name}:{member.name}"))
    if incomplete:
        print(f"data: {incomplete} keys in the shards lack an image or a caption and are left out")
    return records


def find_records(data: Path) -> list[Record]:
    """Every sample of --data, in a fixed order (file order, shards sorted by name)."""
    if (data / "metadata.jsonl").exists() or (data / "metadata.csv").exists():
        records = records_from_metadata(data)
    else:
        shards = [data] if data.suffix == ".tar" else sorted(data.glob("*.tar")) if data.is_dir() else []
        if not shards:
            raise SystemExit(f"--data {data}: found no metadata.jsonl, no metadata.csv and no *.tar shards. Pass a "
                             "synth.py output, a folder of images with metadata.jsonl/.csv (file_name + prompt), or "
                             "a folder of webdataset .tar shards")
        records = records_from_shards(shards)
    if not records:
        raise SystemExit(f"--data {data} holds no sample")
    return records


def load_image(record: Record, res: int) -> torch.Tensor:
    """[3, res, res] fp32 in [-1, 1]: the shorter side resized to res (Lanczos), then the centre crop."""
    with open(record.image, "rb") as f:
        f.seek(record.offset)
        data = f.read(record.size)
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    scale = res / min(image.size)
    if scale != 1:
        image = image.resize([max(res, round(side * scale)) for side in image.size], Image.Resampling.LANCZOS)
    left, top = (image.width - res) // 2, (image.height - res) // 2
    pixels = np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Item (record index, global position) -> the image at --res and its caption features. An image that does not
    decode gives a zero image of weight 0 (every process keeps running the same passes) and the error, for the log."""

    def __init__(self, records: list[Record], res: int):
        self.records, self.res = records, res

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, position = item
        try:
            image, error = load_image(self.records[index], self.res), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... on bad files
            image, error = torch.zeros(3, self.res, self.res), f"{type(e).__name__}: {e}"
        cap = read_caption_features(Path(self.records[index].features)).float()
        return dict(index=index, position=position, image=image, error=error, cap=cap)


def collate(samples: list[dict]) -> dict:
    """Stack a micro-batch; captions of different lengths are right-padded with zero rows and masked."""
    caps = [s["cap"] for s in samples]
    return dict(image=torch.stack([s["image"] for s in samples]), cap=pad_sequence(caps, batch_first=True),
                cap_mask=pad_sequence([torch.ones(len(c), dtype=torch.bool) for c in caps], batch_first=True),
                weight=torch.tensor([float(s["error"] is None) for s in samples]),
                position=[s["position"] for s in samples],
                errors=[(s["index"], s["error"]) for s in samples if s["error"] is not None])


def prompt_column(columns, where: str) -> str:
    column = next((c for c in CAPTION_FIELDS if c in columns), None)
    if column is None:
        raise SystemExit(f"{where}: no prompt column; expected one of {', '.join(CAPTION_FIELDS)}, found "
                         f"{sorted(columns) or 'none'}")
    return column


def read_prompt_file(spec: str) -> list[str]:
    """--prompts of synth.py and sample.py: a .jsonl / .csv file with a prompt, text or caption column, or a text file
    with one prompt per line; blank prompts are skipped, no prompt at all is refused."""
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"--prompts {spec}: cannot read it ({e}). Pass a UTF-8 text file (one prompt per line), "
                         f"or a .jsonl or .csv file with a {'/'.join(CAPTION_FIELDS)} column") from None
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"--prompts {spec}, line {number}: not valid JSON ({e})") from None
            row = row if isinstance(row, dict) else {}
            prompts.append(str(row[prompt_column(row, f'--prompts {spec}, line {number}')]))
    elif path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            column = prompt_column(reader.fieldnames or [], f"--prompts {spec}")
            prompts = [row[column] or "" for row in reader]
        except csv.Error as e:
            raise SystemExit(f"--prompts {spec}: not a readable CSV file ({e})") from None
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise SystemExit(f"--prompts {spec}: it holds no prompt (empty, or only blank lines / blank prompt cells)")
    return prompts


def parse_device(name: str | None) -> torch.device:
    """--device: the GPU where one is visible, else the CPU; one line for a name torch does not know or no GPU."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise SystemExit(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is visible here; pass --device cpu")
    return device


def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) the process group is started:
    NCCL on GPUs, gloo on CPUs; a bare --device cuda means this process's GPU, cuda:LOCAL_RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = parse_device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        # ranks meet at the end of a run and wait for the slowest; after a resume the remaining work can be uneven
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(hours=24), device_id=device if device.type == "cuda" else None)
    return rank, world, device


def finish_distributed():
    """The end of a distributed run: no rank tears the group down while a peer is still in a collective."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_script(main: Callable[[], object]) -> None:
    """A script's entry point. A bad checkpoint or file is one line on stderr and exit status 1, not a traceback.
    Under torchrun the process then leaves without interpreter teardown, which gloo's worker threads can abort
    after the work is done (SIGABRT, pytorch/pytorch#179291), turning a finished run into a failed exit code."""
    try:
        main()
    except (CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def check_finite(parser, args) -> None:
    """parser.error (one line, exit status 2) for a float flag that is nan or infinite, which range checks let pass
    (nan < 0 is False)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} {value}: must be finite")


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, the process's resident high-water mark on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


# ----------------------------------------------------------------------------------------------------------------
# 10. Training memory plan: what train.py keeps where, by mode (standard, low memory, ZeRO), in bytes per process
# ----------------------------------------------------------------------------------------------------------------

# Tensors of one DiT block kept for its backward pass, per token, in [dim] and [ffn_dim] rows (counted in
# DiTBlock.forward: norms, modulation, q k v before and after norm and RoPE, attention output, projections, the three
# SwiGLU products), plus those alive while its gradients are formed.
BLOCK_DIM_ROWS, BLOCK_FFN_ROWS = 22, 7
# Detailer Head, per pixel of a level with c channels (input c_in): encoder conv in/out, skip, decoder upsample,
# concat (2c), conv out and activation, plus the gradients alive at the widest level.
HEAD_ROWS_C, HEAD_ROWS_CIN = 8, 4
# The source's VAE encoding a micro-batch under no_grad (--states source), per pixel, in rows of its first level's
# channels: the peak measured for both VAEs (bench/RESULTS.md, the memory plan).
VAE_ENCODE_ROWS = 6
GIB = 2 ** 30
CHUNK_ELEMENTS = 2 ** 26  # fp32 gradients made from .grad: at most ~this many elements (256 MB) exist at a time


def trainable_counts(cfg: "ZImageConfig | Flux2Config", train_blocks: int, strict: bool, head_only: bool) -> dict:
    """Parameter counts of the freeze policy (set_trainable), from a meta-device model (no memory)."""
    with torch.device("meta"):
        net = new_model(cfg)
    trainable, frozen = set_trainable(net, train_blocks, strict, head_only)
    sizes = [p.numel() for p in net.parameters() if p.requires_grad]
    return dict(trainable=trainable, frozen=frozen, largest=max(sizes), head=[c for _, c in net.local_decoder.levels],
                head_only=head_only)


def activation_bytes(cfg: ZImageConfig, head: list[int], res: int, micro_batch: int, caption_tokens: int,
                     elem: int, checkpointing: bool, head_only: bool = False) -> int:
    """Activations of one forward + backward pass (micro-batch at res x res, captions of caption_tokens); head_only:
    nothing in the DiT needs a gradient, so autograd keeps none of its tensors, one block's at a time are alive."""
    if cfg.family == "flux2":  # a double block counts as one block per stream; captions are not padded
        n_img, n_cap, ffn = (res // cfg.patch_size) ** 2, caption_tokens, cfg.mlp_hidden
        runs = [n_img, n_cap] * cfg.num_layers + [n_img + n_cap] * cfg.num_single_layers
    else:
        n_img, n_cap, ffn = round_up((res // cfg.patch_size) ** 2), round_up(caption_tokens), cfg.ffn_dim
        runs = [n_img] * cfg.n_refiner_layers + [n_cap] * cfg.n_refiner_layers + [n_img + n_cap] * cfg.n_layers
    block = lambda s: s * (BLOCK_DIM_ROWS * cfg.dim + BLOCK_FFN_ROWS * ffn) * elem
    # with checkpointing each block keeps its input and one block at a time is recomputed in full
    dit = sum(runs) * cfg.dim * elem + block(n_img + n_cap) if checkpointing else sum(block(s) for s in runs)
    dit = block(n_img + n_cap) if head_only else dit
    decoder, c_in, side = 0, cfg.in_channels, res
    for c in head:
        decoder, c_in, side = decoder + side * side * (HEAD_ROWS_C * c + HEAD_ROWS_CIN * c_in) * elem, c, side // 2
    pixels = 8 * 3 * res * res * 4  # x0, noise, x_sigma, v, target, difference... in fp32
    return micro_batch * (dit + decoder + pixels)


def memory_plan(cfg: ZImageConfig, counts: dict, *, res: int, micro_batch: int, caption_tokens: int, elem: int,
                low_memory: bool, world: int, zero: bool, ema: bool, checkpointing: bool,
                vae: "FluxVAE | Flux2VAE | None" = None) -> dict:
    """Bytes per process, split into what lives on the GPU and on the host (low-memory mode); `vae` (a meta module
    will do): the source's VAE, which encodes each micro-batch before the forward pass (--states source)."""
    trainable, largest = counts["trainable"], counts["largest"]
    hook = world == 1 and not low_memory
    chunk = trainable if hook else math.ceil(trainable / world) if zero else min(trainable, CHUNK_ELEMENTS + largest)
    optimizer = {"fp32 master weights": 4 * trainable, f"AdamW state{' (own shard)' * zero}": 8 * trainable // (
        world if zero else 1), "fp32 gradients" + (" (accumulators)" if hook else " (being stepped)"): 4 * chunk,
        "EMA": 4 * trainable * ema}
    gpu = {"frozen weights": elem * counts["frozen"], "trained weights": elem * trainable,
           "gradients in flight (largest two)" if hook else "gradients (.grad / DDP buckets)":
               2 * elem * largest if hook else elem * trainable}
    gpu.update({} if low_memory else optimizer)
    encode = 0
    if vae is not None:
        gpu["source VAE"] = elem * sum(p.numel() for p in vae.parameters())
        side = res * latent_token_pixels(vae) // cfg.patch_size  # PixelLift.source_image's input
        encode = micro_batch * side * side * VAE_ENCODE_ROWS * vae.cfg.block_out_channels[0] * elem
    gpu["activations"] = max(encode, activation_bytes(cfg, counts["head"], res, micro_batch, caption_tokens, elem,
                                                      checkpointing, counts["head_only"]))
    host = optimizer if low_memory else {}
    return dict(gpu={k: v for k, v in gpu.items() if v}, host={k: v for k, v in host.items() if v},
                gpu_total=sum(gpu.values()), host_total=sum(host.values()))


def choose_memory_mode(cfg: "ZImageConfig | Flux2Config", counts: dict, *, per_rank: int, micro_batch: int | None,
                       low_memory: bool | None, zero: bool | None, world: int, capacity: float, **sizes
                       ) -> tuple[dict, int, bool, bool]:
    """(plan, micro-batch, low memory, ZeRO): the given ones (not None), else what the plan fits into `capacity`
    bytes; sizes: memory_plan's res, caption_tokens, elem, ema, checkpointing, vae."""
    plan = lambda micro, low, shard: memory_plan(cfg, counts, micro_batch=micro, low_memory=low, world=world,
                                                 zero=shard, **sizes)
    low = low_memory if low_memory is not None else capacity < 36e9 or plan(1, False, world > 1)["gpu_total"] > capacity
    if world == 1 or low:
        zero = False
    elif zero is None:
        zero = plan(1, False, False)["gpu_total"] > capacity
    micro = micro_batch or next((m for m in range(per_rank, 0, -1) if per_rank % m == 0 and
                                 plan(m, low, zero)["gpu_total"] <= capacity), 1)
    return plan(micro, low, zero), micro, low, zero


def format_plan(title: str, plan: dict) -> str:
    lines = [title] + [f"  {where:4s} {label:36s} {size / GIB:8.2f} GiB"
                       for where in ("gpu", "host") for label, size in plan[where].items()]
    return "\n".join(lines + [f"  total per GPU {plan['gpu_total'] / GIB:.2f} GiB, host {plan['host_total'] / GIB:.2f} "
                              "GiB per process (plus the CUDA context and libraries, ~1-3 GiB)"])
