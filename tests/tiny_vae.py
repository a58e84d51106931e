"""Tiny FLUX-shaped VAE checkpoints with random weights, in the layouts load_vae reads (helpers for tests)."""

import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

# FLUX.1's VAE shape (channel ratios 1:2:4:4, 2 resnets per level, 16 latent channels), shrunk
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 64, 64), layers_per_block=2,
    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu", mid_block_add_attention=True, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159, sample_size=64)


def make_tiny_vae_diffusers(seed: int = 0):
    """A diffusers AutoencoderKL with every parameter random: a default init (norms 1, biases 0) would hide
    mistakes in the norms and biases. Convolutions are scaled down so each GroupNorm sees a small variance
    (~1e-3), which makes a wrong GroupNorm eps (1e-5 for 1e-6) show as a ~1e-2 relative error."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                # attention projections at full scale, so that attention is far from uniform
                gain = 0.1 if isinstance(module, nn.Conv2d) else 1.0
                std = gain / module.weight[0].numel() ** 0.5
                module.weight.copy_(std * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=gen))
    return vae


def save_tiny_vae(folder, seed: int = 0, max_shard_size="10GB"):
    """Writes a diffusers vae folder (config.json + safetensors, sharded when max_shard_size is small).
    Returns the diffusers model."""
    vae = make_tiny_vae_diffusers(seed)
    vae.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return vae


def ldm_vae_name(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> the original (LDM / FLUX.1 ae.safetensors) key."""
    up = lambda i: levels - 1 - int(i)  # LDM numbers decoder levels from the image end
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.").replace("attn_1.group_norm.", "attn_1.norm.")
    return re.sub(r"attn_1\.to_([qkv])\.", r"attn_1.\1.", key).replace("attn_1.to_out.0.", "attn_1.proj_out.")


def ldm_vae_state_dict(diffusers_vae, prefix: str = "") -> dict[str, torch.Tensor]:
    levels = len(diffusers_vae.config.block_out_channels)
    out = {}
    for key, tensor in diffusers_vae.state_dict().items():
        name = ldm_vae_name(key, levels)
        if ".attn_1." in name and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM attention projections are 1x1 convs
        out[prefix + name] = tensor.contiguous()
    return out


def write_ae_safetensors(diffusers_vae, path, prefix: str = "") -> Path:
    """Writes the VAE as FLUX.1's ae.safetensors (LDM naming), keys optionally prefixed (e.g. 'first_stage_model.')."""
    save_file(ldm_vae_state_dict(diffusers_vae, prefix), str(path))
    return Path(path)
