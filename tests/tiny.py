"""Tiny random checkpoints in the exact published layouts, built in the test (nothing is downloaded)."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = Path(__file__).resolve().parent / "formats"

TINY_DIT = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=3, n_refiner_layers=2,
                n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24, rope_theta=256.0,
                t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])


def read_format(name: str) -> dict[str, tuple[int, ...]]:
    """tests/formats/<name>.tsv (copied from the project's reference tables) -> {key: shape}."""
    shapes = {}
    for line in (FORMATS / f"{name}.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return shapes


def randomise_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1, the rest small), so no default-init zero hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or name.endswith("0.weight") and "cap_embedder" in name):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))
    return module


def make_diffusers_dit(seed: int = 0, **overrides):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return randomise_(ZImageTransformer2DModel(**{**TINY_DIT, **overrides}), seed).eval()


def to_comfy(state: dict[str, torch.Tensor], prefix: str = "", norm_final: bool = False) -> dict[str, torch.Tensor]:
    """diffusers names -> ComfyUI single-file names (written independently of model.py's reverse mapping)."""
    out = {}
    for key, t in state.items():
        if ".attention.to_q." in key:
            base = key.split(".attention.to_q.")[0]
            out[f"{base}.attention.qkv.weight"] = torch.cat(
                [state[f"{base}.attention.to_{n}.weight"] for n in "qkv"]).contiguous()
            continue
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        key = key.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
        key = key.replace(".attention.norm_k.", ".attention.k_norm.")
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        out[key] = t.contiguous()
    if norm_final:
        out["norm_final.weight"] = torch.ones(state["cap_pad_token"].shape[1])
    return {prefix + k: v for k, v in out.items()}


def save_single_file(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_random_dit_folder(folder: Path, dim: int = 512, n_layers: int = 8, shard_bytes: float = 60e6):
    """A Z-Image transformer/ folder of a few hundred MB of random fp32 shards + index, for memory checks.

    Returns (folder, size in bytes, number of shards).
    """
    import model

    config = {**TINY_DIT, "_class_name": "ZImageTransformer2DModel", "dim": dim, "n_heads": dim // 32,
              "n_layers": n_layers, "cap_feat_dim": 256}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = model.ZImageDiT(model.config_from_json(model.ZImageConfig, folder / "config.json")).state_dict()
    groups, group = [], []
    for key, t in shapes.items():
        group.append((key, t.shape))
        if sum(math.prod(s) for _, s in group) * 4 > shard_bytes:
            groups.append(group)
            group = []
    groups.append(group)
    weight_map, size = {}, 0
    for i, group in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: torch.randn(s) for k, s in group}, str(folder / name))
        weight_map.update({k: name for k, _ in group})
        size += sum(math.prod(s) * 4 for _, s in group)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, size, len(groups)


def make_tiny_zimage_repo(root: Path, seed: int = 0) -> Path:
    """A Z-Image repo root in the published layout (transformer/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) with tiny random weights: DiT dim 64 / 3 layers, VAE 16-32-64-64, Qwen3 hidden 64 / 3 layers."""
    from tiny_text import make_tiny_text_encoder
    from tiny_vae import save_tiny_vae

    root = Path(root)
    text = make_tiny_text_encoder(root, seed=seed)
    save_tiny_vae(root / "vae", seed=seed)
    make_diffusers_dit(seed=seed, cap_feat_dim=text["hidden_size"]).save_pretrained(root / "transformer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
         "use_dynamic_shifting": False}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    return root


def give_head_an_output(ckpt: Path, seed: int = 0) -> Path:
    """convert.py starts the Detailer Head's output conv at zero (an untrained model predicts v = 0); tests that
    compare outputs need outputs that depend on the input: a random output conv, the file's metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(ckpt), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(ckpt))
    weight = state["local_decoder.out_conv.weight"]
    random = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(weight.shape[1])
    state["local_decoder.out_conv.weight"] = random.to(weight.dtype)
    save_file(state, str(ckpt), metadata=metadata)
    return ckpt


# ---- FLUX.2 [klein] ----

TINY_FLUX2_DIT = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256, mlp_ratio=3.0,
                      axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False)
TINY_FLUX2_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
KLEIN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, time_shift_type="exponential")


def make_flux2_dit(seed: int = 0, **overrides):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return randomise_(Flux2Transformer2DModel(**{**TINY_FLUX2_DIT, **overrides}), seed).eval()


def make_flux2_vae(seed: int = 0):
    """AutoencoderKLFlux2 with every parameter random and non-trivial bn statistics (0/1 would hide a missing
    normalisation). Convolutions are scaled down so that each GroupNorm sees a small variance, as tests/tiny_vae."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**TINY_FLUX2_VAE).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                gain = 0.1 if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1) else 1.0
                module.weight.copy_(gain / module.weight[0].numel() ** 0.5 * torch.randn(module.weight.shape,
                                                                                        generator=gen))
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=gen))
        vae.bn.running_mean.copy_(0.05 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.01 * (0.2 + torch.rand(vae.bn.running_var.shape, generator=gen)))
        vae.bn.num_batches_tracked.fill_(1234)
    return vae


def set_distilled(root: Path, distilled: bool):
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                       "is_distilled": distilled}))


def make_tiny_klein_repo(root: Path, distilled: bool, text_layers: int = 28, seed: int = 3) -> Path:
    """A FLUX.2 [klein] repo root in the published layout with tiny random weights. The scripts read FLUX.2's
    hidden states 9, 18 and 27, which need a Qwen3 of 27+ layers; a 3-layer one serves tests that pass layers=."""
    from tiny_text import make_tiny_text_encoder

    root = Path(root)
    text = make_tiny_text_encoder(root, num_layers=text_layers)
    make_flux2_vae().save_pretrained(root / "vae")
    make_flux2_dit(seed=seed, joint_attention_dim=3 * text["hidden_size"]).save_pretrained(root / "transformer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **KLEIN_SCHEDULER}))
    set_distilled(root, distilled)
    return root
