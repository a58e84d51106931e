# ----------------------------------------------------------------------------------------------------------------
# 4. VAE (FLUX.1 AutoencoderKL, the autoencoder of Z-Image; module names follow diffusers so its folders load as-is)
# ----------------------------------------------------------------------------------------------------------------

# Standalone-file imports: when this section moves into model.py only `import re` is new there.
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (CheckpointError, assign_weights, component_dir, config_from_json, read_tensors, safetensors_files,
                   safetensors_shapes)


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
        z = latent.to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z / self.cfg.scaling_factor + self.cfg.shift_factor)


# The original FLUX.1 ae.safetensors names the same weights the LDM way; these renames take it to ours.
LDM_VAE_RENAMES = [
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
]


def flux_vae_from_ldm(items: Iterable[tuple[str, torch.Tensor]], levels: int = 4) -> Iterator[tuple[str, torch.Tensor]]:
    """(LDM key, tensor) -> (diffusers key, tensor), prefix already stripped; `levels` = len(block_out_channels)."""
    def up_level(m):
        i = levels - 1 - int(m[1])  # LDM numbers decoder levels from the image end, diffusers from the latent end
        return f".up_blocks.{i}.resnets." if m[2] == "block" else f".up_blocks.{i}.upsamplers.0."

    for key, tensor in items:
        for pattern, new in LDM_VAE_RENAMES:
            key = re.sub(pattern, new, key)
        key = re.sub(r"\.up\.(\d+)\.(block|upsample)\.", up_level, key)
        if ".attentions.0.to_" in key and tensor.ndim == 4:
            tensor = tensor.flatten(1)  # the LDM attention projections are 1x1 convs: [C, C, 1, 1] -> [C, C]
        yield key, tensor


def vae_naming(keys: Iterable[str]) -> tuple[str, str]:
    """('diffusers' or 'LDM', key prefix), read from the names alone."""
    keys = set(keys)
    for prefix in ("", "first_stage_model.", "vae."):
        if f"{prefix}decoder.mid_block.resnets.0.conv1.weight" in keys:
            return "diffusers", prefix
        if f"{prefix}decoder.mid.block_1.conv1.weight" in keys:
            return "LDM", prefix
    raise CheckpointError(
        f"not a VAE checkpoint: none of its {len(keys)} tensors is a VAE decoder's (first keys: {sorted(keys)[:3]}). "
        "Pass the Z-Image repo root, its vae/ folder, or FLUX.1's ae.safetensors")


def load_vae(path, device="cpu", dtype=torch.float32, config: FluxVAEConfig | None = None) -> FluxVAE:
    """Load from a repo root (with vae/), a diffusers vae folder (sharded or not), or one .safetensors file in
    diffusers or LDM (FLUX.1 ae.safetensors) names, optionally prefixed 'first_stage_model.' or 'vae.'.

    config: the architecture when it is not FLUX.1's; by default the folder's config.json, else FluxVAEConfig().
    """
    path = component_dir(path, "vae")
    if not (path.is_dir() or path.suffix == ".safetensors" and path.exists()):
        raise CheckpointError(f"{path}: expected a repo root, a vae folder or an existing .safetensors file")
    files = safetensors_files(path) if path.is_dir() else [path]
    if config is None:
        config_file = path / "config.json"
        config = config_from_json(FluxVAEConfig, config_file) if config_file.exists() else FluxVAEConfig()
    naming, prefix = vae_naming(safetensors_shapes(files))
    layout = f"{'folder' if path.is_dir() else 'single file'}, {naming} names" + (f", prefix '{prefix}'" if prefix else "")
    with torch.device("meta"):
        vae = FluxVAE(config)
    tensors = read_tensors(files, strip_prefix=prefix)
    if naming == "LDM":
        tensors = flux_vae_from_ldm(tensors, levels=len(config.block_out_channels))
    return assign_weights(vae, tensors, layout, device=device, dtype=dtype).eval()
