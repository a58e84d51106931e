"""
Speed and memory of l2p's networks: our Z-Image DiT against diffusers and DiffSynth, and L2P against its latent
source (the paper's "4K and beyond": -97.67% time per step, -38.81% peak memory at 4096^2).

    python bench/speed.py --device cpu --size small         # scaled down, a few minutes on a laptop CPU
    python bench/speed.py --device cuda --size real         # real-size random weights in bf16 (one GPU, ~1.5 min)

Sections (each prints a markdown table; everything lands in one JSON file, --out)
  1. DiT       forward and forward+backward time of model.ZImageDiT, diffusers' ZImageTransformer2DModel and
               DiffSynth's Z-Image DiT on one config and literally the same weights (the three modules share one
               set of Parameter objects); runs interleaved A B C A B C ..., medians, ratio ours / theirs. The same
               for model.Flux2DiT against diffusers' Flux2Transformer2DModel (FLUX.2 [klein]'s layout)
  2. Sampling  time per denoising step and peak memory of L2P (64x64 tokens at every size: patch 16 / 32 / 64 at
               1K / 2K / 4K) against the source LDM at the same output size (VAE x8 + patch 2: 4,096 / 16,384 /
               65,536 tokens) plus its VAE decode; batch 1, no CFG batch (on CUDA the 4K decode runs in 4 row bands:
               its 256 x 4096^2 activations are past what CUDA kernels index with 32 bits)
  3. Training  train.py's own step at 1024^2, in standard and low-memory mode (run through train.main on random
               weights and data): images/s, model FLOP utilisation, peak GPU memory against train.py's plan, peak
               host memory

Sizes: real = the published Z-Image (dim 3840, 30 layers); small and tiny scale widths, depths, caption lengths and
output sizes down and keep the ratios that decide the comparisons (see SIZES and the notes printed with each table).
Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU each configuration runs in a fresh subprocess and reports
its resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus its resident set before it built
anything, i.e. weights + activations + allocator overhead, without the Python / torch baseline.
diffusers and diffsynth are benchmark-only extras (bench/requirements.txt); a missing one is reported, not fatal.
"""

import argparse
import ast
import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the paper's 4K figure (GPU not named): source LDM vs L2P
PAPER_4K = {"source": {"time_per_step_s": 51.14, "peak_memory_gb": 43.78},
            "L2P": {"time_per_step_s": 1.19, "peak_memory_gb": 26.79},
            "time_per_step_ratio": 1.19 / 51.14, "peak_memory_ratio": 26.79 / 43.78}
# output sizes of the sampling comparison at real scale: (name, pixels per side, L2P patch)
OUTPUT_SIZES = (("1K", 1024, 16), ("2K", 2048, 32), ("4K", 4096, 64))
SHIFT = 3.0

# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSize:
    dim: int                 # DiT width (heads of 128 channels at real and small size, as published)
    n_heads: int
    n_layers: int            # main layers of the sampling / training model
    n_refiner_layers: int
    cap_feat_dim: int
    train_blocks: int        # set_trainable's n: first and last n main layers train (5 of 30 at real size)
    dit_layers: int          # main layers of the section-1 model (the implementations differ per layer, not per depth)
    dit_grid: int            # section 1: image tokens per side (64 = a 1024^2 latent)
    dit_cap_len: int         # section 1: caption tokens
    pixel_divisor: int       # sections 2-3: output sizes are the real ones / this (tokens / its square)
    sample_cap_len: int      # sections 2-3: caption tokens
    width_divisor: int       # sections 2-3: Detailer Head (head_width 64 / this) and VAE widths / this (and groups)
    reps: int                # section 1: interleaved timed rounds
    steps: int               # section 2: timed denoising steps per row (median; after a warm-up step on a GPU)
    train_batch: int
    train_steps: int         # section 3: timed train steps (after one warm-up step)
    matmul_n: int            # side of the square matmul that measures the device's peak

    @property
    def axes_dims(self) -> tuple[int, int, int]:
        head = self.dim // self.n_heads  # Z-Image's RoPE split (32, 48, 48) of 128, scaled for smaller heads
        return head // 4, head * 3 // 8, head - head // 4 - head * 3 // 8

    def dit_config(self, n_layers: int | None = None) -> model.ZImageConfig:
        return model.ZImageConfig(dim=self.dim, n_heads=self.n_heads, n_layers=n_layers or self.n_layers,
                                  n_refiner_layers=self.n_refiner_layers, cap_feat_dim=self.cap_feat_dim,
                                  axes_dims=self.axes_dims)

    def flux2_config(self) -> model.Flux2Config:
        """FLUX.2 [klein] at this size: 1 double-stream block per 4 single-stream (klein: 5 + 20), heads of 128."""
        singles = max(1, self.dit_layers * 2 // 3)
        return model.Flux2Config(num_layers=max(1, singles // 4), num_single_layers=singles,
                                 num_attention_heads=self.dim // 128 if self.dim >= 128 else 2,
                                 attention_head_dim=128 if self.dim >= 128 else self.dim // 2,
                                 joint_attention_dim=3 * self.cap_feat_dim,
                                 axes_dims_rope=((32,) if self.dim >= 128 else (self.dim // 8,)) * 4)

    def l2p_config(self, patch: int) -> model.ZImageConfig:
        return model.l2p_config(self.dit_config(), patch, head_width=64 // self.width_divisor)

    def vae_config(self) -> model.FluxVAEConfig:
        real = model.FluxVAEConfig()
        return replace(real, block_out_channels=tuple(c // self.width_divisor for c in real.block_out_channels),
                       norm_num_groups=real.norm_num_groups // self.width_divisor)


SIZES = {
    # the published model, bf16 on one GPU
    "real": BenchSize(dim=3840, n_heads=30, n_layers=30, n_refiner_layers=2, cap_feat_dim=2560, train_blocks=5,
                      dit_layers=30, dit_grid=64, dit_cap_len=200, pixel_divisor=1, sample_cap_len=200,
                      width_divisor=1, reps=7, steps=3, train_batch=2, train_steps=3, matmul_n=8192),
    # CPU scale: DiT width / 10 (3 heads of 128), all 30 layers; output sizes / 4 per side, so every token count / 16:
    # L2P keeps 16x16 tokens at every size while the source's grow 4x per doubling (256 .. 4,096), as at real size
    # (64x64 vs 4,096 .. 65,536); Detailer Head and VAE widths / 8; caption 12 tokens (real ~200, / 16)
    "small": BenchSize(dim=384, n_heads=3, n_layers=30, n_refiner_layers=2, cap_feat_dim=256, train_blocks=5,
                       dit_layers=6, dit_grid=32, dit_cap_len=100, pixel_divisor=4, sample_cap_len=12,
                       width_divisor=8, reps=9, steps=3, train_batch=2, train_steps=3, matmul_n=2048),
    # smoke-test scale: every code path in seconds; numbers mean nothing
    "tiny": BenchSize(dim=64, n_heads=2, n_layers=4, n_refiner_layers=1, cap_feat_dim=32, train_blocks=1,
                      dit_layers=2, dit_grid=8, dit_cap_len=20, pixel_divisor=16, sample_cap_len=4,
                      width_divisor=8, reps=2, steps=1, train_batch=1, train_steps=1, matmul_n=256),
}

# ----------------------------------------------------------------------------------------------------------------
# Helpers: devices, timing, memory
# ----------------------------------------------------------------------------------------------------------------


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock = CLOCKS["wall"]  # set from --clock


def timed(fn, device: str):
    """(seconds, result) of fn(), the device synchronised on both ends."""
    sync(device)
    start = clock()
    out = fn()
    sync(device)
    return clock() - start, out


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak bytes allocated between start() and peak(): CUDA's allocator counter, or on CPU the resident-set
    high-water mark (reset to the current resident set by writing 5 to /proc/self/clear_refs) minus the resident
    set at start(). Run the CPU measurement in a fresh process: freed heap pages stay resident and would hide a
    later configuration's allocations."""

    def __init__(self, device: str):
        self.device = device

    def start(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(OSError, AttributeError):  # hand freed heap pages back, so that reuse shows
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # old kernel: VmHWM then also holds the import-time peak, an over-estimate at worst
        self.base = proc_status_kb("VmRSS") * 1024

    def peak(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return proc_status_kb("VmHWM") * 1024 - self.base


def free_device_memory(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads)"
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """The device's dense matmul throughput in FLOP/s: best of `reps` n x n x n products after two warm-ups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = min(timed(lambda: a @ b, device)[0] for _ in range(reps))
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------------------------------------------
# Models: random weights, shared between implementations
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random in place (norm weights around 1, matrices ~ 0.5 / sqrt(fan_in), vectors small), drawn
    on the module's device so that billions of parameters take a second on a GPU."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
        if p.ndim == 1 and "norm" in name:
            p.copy_(1 + 0.1 * noise)
        elif p.ndim > 1 and "pad_token" not in name:
            p.copy_(noise * 0.5 / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.1 * noise)
    return module


def build(make, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """make() on the meta device, then memory for the weights in `dtype` on `device` (nothing else), then random."""
    with torch.device("meta"):
        module = make()
    return randomise_(module.to(dtype).to_empty(device=device), seed).eval()


def build_dit(cfg: model.ZImageConfig, device: str, dtype: torch.dtype, seed: int = 0):
    return build(lambda: model.ZImageDiT(cfg), device, dtype, seed)


def diffusers_config(cfg: model.ZImageConfig) -> dict:
    return dict(all_patch_size=(cfg.patch_size,), all_f_patch_size=(1,), in_channels=cfg.in_channels, dim=cfg.dim,
                n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_heads, norm_eps=cfg.norm_eps, qk_norm=True, cap_feat_dim=cfg.cap_feat_dim,
                rope_theta=cfg.rope_theta, t_scale=cfg.t_scale, axes_dims=list(cfg.axes_dims),
                axes_lens=[1536, 512, 512])


def share_weights(other: nn.Module, ours: nn.Module) -> nn.Module:
    """Make `other` (built on the meta device, same state-dict keys) use our Parameter objects themselves."""
    other.load_state_dict(ours.state_dict(keep_vars=True), strict=True, assign=True)
    left = [n for n, t in [*other.named_parameters(), *other.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(other).__name__} kept tensors that are not in the state dict: {left[:3]}")
    return other.eval()


def import_diffsynth_zimage():
    """(DiffSynth's Z-Image DiT class, its Z-Image-Turbo forward function, how they were imported).

    The forward is diffsynth.pipelines.z_image.model_fn_z_image_turbo, what DiffSynth's ZImagePipeline runs (the
    module's own ZImageDiT.forward fails on plain text-to-image input in diffsynth 2.1.12). Importing the pipelines
    needs DiffSynth's whole toolkit (torchvision, imageio, modelscope, ...); when that fails, the DiT module is loaded
    alone (its imports are torch and einops) by standing in for the package __init__ files, and the forward function
    is compiled from the installed pipelines/z_image.py by itself.
    """
    try:
        from diffsynth.models.z_image_dit import ZImageDiT
        from diffsynth.pipelines.z_image import model_fn_z_image_turbo
        return ZImageDiT, model_fn_z_image_turbo, "diffsynth.pipelines.z_image"
    except ImportError as e:
        full_error = f"{type(e).__name__}: {e}"
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("diffsynth is not installed (see bench/requirements.txt)")
    for name in [n for n in sys.modules if n == "diffsynth" or n.startswith("diffsynth.")]:
        del sys.modules[name]
    root = Path(spec.submodule_search_locations[0])
    for name in ("diffsynth", "diffsynth.core", "diffsynth.models"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = package
    try:
        dit_module = importlib.import_module("diffsynth.models.z_image_dit")
    except ImportError as e:
        raise ImportError(f"diffsynth: full import failed ({full_error}); DiT module alone failed ({e})") from None
    pipeline_file = root / "pipelines" / "z_image.py"
    tree = ast.parse(pipeline_file.read_text())
    function = next((node for node in tree.body if isinstance(node, ast.FunctionDef)
                     and node.name == "model_fn_z_image_turbo"), None)
    if function is None:
        raise ImportError(f"no model_fn_z_image_turbo in {pipeline_file}")
    namespace = {"torch": torch, "rearrange": importlib.import_module("einops").rearrange,
                 "gradient_checkpoint_forward": dit_module.gradient_checkpoint_forward,
                 "ZImageDiT": dit_module.ZImageDiT, "ZImageControlNet": object}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(pipeline_file), "exec"), namespace)
    return dit_module.ZImageDiT, namespace["model_fn_z_image_turbo"], \
        f"model_fn_z_image_turbo from {pipeline_file.name} without the package __init__ ({full_error[:80]})"


def diffsynth_fp32_timestep_shim(dit: nn.Module):
    """DiffSynth's timestep MLP casts its input to bf16 unconditionally; in an fp32 run cast to the weights' dtype
    instead (a 256-wide MLP once per forward: no effect on the timing)."""
    embedder = dit.t_embedder
    if embedder.mlp[0].weight.dtype != torch.bfloat16:
        embedder.forward = lambda t: embedder.mlp(
            embedder.timestep_embedding(t, embedder.frequency_embedding_size).to(embedder.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# FLOP counting (analytic, from the shapes each op sees)
# ----------------------------------------------------------------------------------------------------------------


class FlopCounter:
    """Forward FLOPs, by kind, of the code run inside `with FlopCounter() as flops:`: `frozen` and `trainable`
    (F.linear and F.conv2d, which nn.Linear / nn.Conv2d call: 2 x MACs from the tensors' shapes, by whether the
    weight, or the parameter it is a view of, requires grad) and `attention` (F.scaled_dot_product_attention:
    2 S_q S_k (d_qk + d_v) per head and sample).

    A training step costs (fwd + input grad + weight grad) 6 x per trainable FLOP = 3 x `trainable`, 4 x (fwd +
    input grad) = 2 x `frozen` (frozen layers still pass the gradient to the trainable layers below them), and
    3 x `attention` (backward: 4 products, forward: 2). Gradient checkpointing recomputes the forward of each block
    once more; model FLOP utilisation does not count that (hardware utilisation would).
    """

    PATCHED = ("linear", "conv2d", "scaled_dot_product_attention")

    def __init__(self):
        self.flops = {"frozen": 0, "trainable": 0, "attention": 0}

    def _count_layer(self, out: torch.Tensor, weight: torch.Tensor):
        parameter = weight if weight._base is None else weight._base  # a slice of a conv weight (conv_on_concat)
        kind = "trainable" if parameter.requires_grad else "frozen"
        self.flops[kind] += 2 * out.numel() * weight[0].numel()  # MACs per output: in_features, or C_in/groups k k

    def __enter__(self):
        self.originals = {name: getattr(F, name) for name in self.PATCHED}
        linear, conv2d, sdpa = (self.originals[name] for name in self.PATCHED)

        def counting_linear(x, weight, *args, **kwargs):
            out = linear(x, weight, *args, **kwargs)
            self._count_layer(out, weight)
            return out

        def counting_conv2d(x, weight, *args, **kwargs):
            out = conv2d(x, weight, *args, **kwargs)
            self._count_layer(out, weight)
            return out

        def counting_sdpa(q, k, v, *args, **kwargs):
            heads_and_batch = math.prod(q.shape[:-2])
            self.flops["attention"] += 2 * heads_and_batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            return sdpa(q, k, v, *args, **kwargs)

        F.linear, F.conv2d, F.scaled_dot_product_attention = counting_linear, counting_conv2d, counting_sdpa
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(F, name, original)

    @property
    def forward_total(self) -> int:
        return sum(self.flops.values())

    @property
    def train_step(self) -> int:
        return 3 * self.flops["trainable"] + 2 * self.flops["frozen"] + 3 * self.flops["attention"]


# ----------------------------------------------------------------------------------------------------------------
# 1. DiT: ours vs diffusers vs DiffSynth
# ----------------------------------------------------------------------------------------------------------------


def dit_inputs(cfg: model.ZImageConfig, grid: int, cap_len: int, batch: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, grid * cfg.patch_size, grid * cfg.patch_size, generator=g)
    sigma = torch.rand(batch, generator=g)
    cap = torch.randn(batch, cap_len, cfg.cap_feat_dim, generator=g)
    return x.to(device), sigma.to(device), cap.to(device), torch.ones(batch, cap_len, dtype=torch.bool, device=device)


def dit_runners(ours: nn.Module, cfg: model.ZImageConfig, dtype: torch.dtype, device: str, x, sigma, cap, mask,
                compare_model: str | None = None):
    """name -> (callable returning v = eps - x0 fp32 [B, C, H, W], note) for each implementation that loads;
    name -> error message for one that does not."""
    runners, errors = {}, {}
    xd, capd = x.to(dtype), cap.to(dtype)
    runners["ours"] = (lambda: ours(xd, sigma, capd, mask), f"model.ZImageDiT ({Path(model.__file__).name})")

    def list_call(dit, **kwargs):  # both references take per-sample lists, t = 1 - sigma, and return x0 - eps
        caps = [c[m] for c, m in zip(capd, mask)]
        out = dit([xi.unsqueeze(1) for xi in xd], 1 - sigma, caps, **kwargs)
        return -torch.stack([o.squeeze(1) for o in (out[0] if isinstance(out, tuple) else out)]).float()

    try:
        from diffusers import ZImageTransformer2DModel
        with torch.device("meta"):
            ref = ZImageTransformer2DModel(**diffusers_config(cfg))
        ref = share_weights(ref, ours)
        runners["diffusers"] = (lambda: list_call(ref, return_dict=False),
                                f"diffusers {package_version('diffusers')} ZImageTransformer2DModel")
    except Exception as e:  # noqa: BLE001 -- any failure to build it is a result to report
        errors["diffusers"] = f"{type(e).__name__}: {e}"
    try:
        if x.shape[0] != 1:
            raise ValueError("DiffSynth's Z-Image-Turbo forward takes batch 1 (it folds the batch into frames)")
        DiffSynthDiT, diffsynth_forward, how = import_diffsynth_zimage()
        with torch.device("meta"):
            dsy = DiffSynthDiT(**diffusers_config(cfg))
        dsy = share_weights(dsy, ours)
        diffsynth_fp32_timestep_shim(dsy)
        # its scheduler's timestep is sigma * 1000; prompt_embeds are the valid caption rows [L, cap_feat_dim]
        runners["diffsynth"] = (lambda: diffsynth_forward(dsy, latents=xd, timestep=sigma * 1000,
                                                          prompt_embeds=capd[0][mask[0]]).float(),
                                f"diffsynth {package_version('diffsynth')} ZImageDiT + {how.split(' (')[0]}")
    except Exception as e:  # noqa: BLE001
        errors["diffsynth"] = f"{type(e).__name__}: {e}"
    if compare_model:
        try:
            spec = importlib.util.spec_from_file_location("candidate_model", compare_model)
            candidate_module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(candidate_module)
            with torch.device("meta"):
                known = {f.name for f in fields(candidate_module.ZImageConfig)}
                candidate = candidate_module.ZImageDiT(
                    candidate_module.ZImageConfig(**{k: v for k, v in asdict(cfg).items() if k in known}))
            candidate = share_weights(candidate, ours)
            runners["candidate"] = (lambda: candidate(xd, sigma, capd, mask), f"--compare-model {compare_model}")
        except Exception as e:  # noqa: BLE001
            errors["candidate"] = f"{type(e).__name__}: {e}"
    return runners, errors


def flux2_runners(ours: nn.Module, cfg: model.Flux2Config, dtype: torch.dtype, x, sigma, cap, mask):
    """ours and diffusers' Flux2Transformer2DModel on the same Parameter objects (its output is v already)."""
    runners, errors = {}, {}
    xd, capd = x.to(dtype), cap.to(dtype)
    runners["ours"] = (lambda: ours(xd, sigma, capd, mask), f"model.Flux2DiT ({Path(model.__file__).name})")
    try:
        from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
        known = inspect.signature(Flux2Transformer2DModel.__init__).parameters
        with torch.device("meta"):
            ref = Flux2Transformer2DModel(patch_size=1, guidance_embeds=False, **{  # l2p's own fields left out
                k: v for k, v in asdict(cfg).items() if k in known and k != "patch_size"})
        ref = share_weights(ref, ours)
        tokens, ids = xd.flatten(2).transpose(1, 2), Flux2KleinPipeline._prepare_latent_ids(xd)
        runners["diffusers"] = (lambda: ref(
            hidden_states=tokens, encoder_hidden_states=capd, timestep=sigma, img_ids=ids, guidance=None,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(capd), return_dict=False)[0].transpose(1, 2).reshape(
            x.shape).float(), f"diffusers {package_version('diffusers')} Flux2Transformer2DModel")
    except Exception as e:  # noqa: BLE001 -- any failure to build it is a result to report
        errors["diffusers"] = f"{type(e).__name__}: {e}"
    return runners, errors


def bench_dit(size: BenchSize, device: str, dtype: torch.dtype, batch: int, compare_model: str | None = None,
              family: str = "zimage") -> dict:
    if family == "flux2":  # FLUX.2 attends to all 512 caption positions (pads included): 512 at real size
        cfg, cap_len = size.flux2_config(), 512 // size.pixel_divisor
        ours = build(lambda: model.Flux2DiT(cfg), device, dtype, seed=0)
        x, sigma, cap, mask = dit_inputs(cfg, size.dit_grid, cap_len, batch, device)
        runners, errors = flux2_runners(ours, cfg, dtype, x, sigma, cap, mask)
        description = (f"FLUX.2 [klein] layout: dim {cfg.dim}, {cfg.num_attention_heads} heads of "
                       f"{cfg.attention_head_dim}, {cfg.num_layers} double + {cfg.num_single_layers} single blocks")
    else:
        cfg, cap_len = size.dit_config(size.dit_layers), size.dit_cap_len
        ours = build_dit(cfg, device, dtype)
        x, sigma, cap, mask = dit_inputs(cfg, size.dit_grid, cap_len, batch, device)
        runners, errors = dit_runners(ours, cfg, dtype, device, x, sigma, cap, mask, compare_model)
        description = (f"Z-Image layout: dim {cfg.dim}, {cfg.n_heads} heads of {cfg.dim // cfg.n_heads}, "
                       f"{cfg.n_layers} layers + {cfg.n_refiner_layers}+{cfg.n_refiner_layers} refiners")
    params = list(ours.parameters())

    def forward(run):
        with torch.no_grad():
            return run()

    def forward_backward(run):
        v = run()
        v.square().mean().backward()
        for p in params:
            p.grad = None

    results = {name: {"implementation": note, "forward_s": [], "forward_backward_s": []}
               for name, (_, note) in runners.items()}
    reference = None
    for name, (run, _) in list(runners.items()):  # warm-up round, also checks that they agree
        try:
            v = forward(run)
            forward_backward(run)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory at real size: report, go on
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del runners[name], results[name]
            free_device_memory(device)
            continue
        if reference is None:
            reference = v
        else:
            results[name]["rel_diff_vs_ours"] = ((v - reference).norm() / reference.norm()).item()
    for phase, fn in (("forward_s", forward), ("forward_backward_s", forward_backward)):
        for _ in range(size.reps):  # A B C A B C ...
            for name, (run, _) in list(runners.items()):
                try:
                    results[name][phase].append(timed(lambda: fn(run), device)[0])
                except Exception as e:  # noqa: BLE001 -- e.g. out of memory at real size: report, go on
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    del runners[name], results[name]
                    free_device_memory(device)
    for r in results.values():
        for phase in ("forward", "forward_backward"):
            r[f"{phase}_median_s"] = statistics.median(r[f"{phase}_s"])
            r[f"{phase}_min_s"] = min(r[f"{phase}_s"])
    ours_r = results.get("ours")
    ratios, paired_ratios = {}, {}
    for name, r in results.items():
        if name == "ours" or ours_r is None:
            continue
        ratios[f"ours/{name}"] = {phase: ours_r[f"{phase}_median_s"] / r[f"{phase}_median_s"]
                                  for phase in ("forward", "forward_backward")}
        # the median over rounds of ours / theirs in the same round: load that drifts between rounds cancels
        paired_ratios[f"ours/{name}"] = {phase: statistics.median(a / b for a, b in zip(ours_r[f"{phase}_s"],
                                                                                        r[f"{phase}_s"]))
                                         for phase in ("forward", "forward_backward")}
    n_img = size.dit_grid ** 2
    sequence = n_img + cap_len if family == "flux2" else model.round_up(n_img) + model.round_up(cap_len)
    return {"family": family, "config": {**asdict(cfg), "n_params": sum(p.numel() for p in params),
                                         "description": description},
            "inputs": {"batch": batch, "image_tokens": n_img, "caption_tokens": cap_len, "sequence": sequence,
                       "dtype": str(dtype)},
            "implementations": results, "unavailable": errors, "ratios": ratios, "paired_ratios": paired_ratios}


def dit_table(r: dict) -> str:
    cfg, inp = r["config"], r["inputs"]
    lines = [f"### 1. {'FLUX.2' if r['family'] == 'flux2' else 'Z-Image'} DiT: ours vs the references (same config, "
             f"same Parameter objects, interleaved, median of "
             f"{max([len(i['forward_s']) for i in r['implementations'].values()] or [0])})",
             f"config: {cfg['description']}, "
             f"{cfg['n_params'] / 1e6:.1f}M params; batch {inp['batch']}, {inp['image_tokens']} image tokens + "
             f"{inp['caption_tokens']} caption tokens (sequence {inp['sequence']}), {inp['dtype']}", "",
             "| implementation | forward (s) | fwd+bwd (s) | ours / it, forward | ours / it, fwd+bwd | "
             "rel. diff of v vs ours |",
             "|---|---|---|---|---|---|"]
    for name, res in r["implementations"].items():
        ratio = r["ratios"].get(f"ours/{name}", {})
        fwd, fwd_bwd = (f"{ratio[k]:.3f}" if k in ratio else "-" for k in ("forward", "forward_backward"))
        diff = f"{res['rel_diff_vs_ours']:.1e}" if "rel_diff_vs_ours" in res else "-"
        lines.append(f"| {name}: {res['implementation']} | {res['forward_median_s']:.4f} | "
                     f"{res['forward_backward_median_s']:.4f} | {fwd} | {fwd_bwd} | {diff} |")
    for name, err in r["unavailable"].items():
        lines.append(f"| {name}: not measured | - | - | - | - | {err} |")
    if r["paired_ratios"]:
        lines += ["", "ours / it, median over rounds of the same-round ratio (forward / fwd+bwd; robust to load that "
                      "drifts between rounds): " + ", ".join(f"{name.split('/')[1]} {q['forward']:.3f} / "
                                                             f"{q['forward_backward']:.3f}"
                                                             for name, q in r["paired_ratios"].items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 2. Sampling: L2P vs the source LDM + VAE decode, 1K / 2K / 4K
# ----------------------------------------------------------------------------------------------------------------


def sampling_configs(size: BenchSize) -> list[dict]:
    configs = []
    for name, real_px, patch in OUTPUT_SIZES:
        px = real_px // size.pixel_divisor
        configs.append(dict(section="sampling", output=name, model="source", pixels=px, patch=2,
                            tokens=(px // 16) ** 2))
        configs.append(dict(section="sampling", output=name, model="L2P", pixels=px, patch=patch,
                            tokens=(px // patch) ** 2))
    return configs


def run_sampling(spec: dict, size: BenchSize, device: str, dtype: torch.dtype) -> dict:
    """One row: build the DiT (+ VAE for the source), time `size.steps` single Euler steps (after a warm-up step on a
    GPU), decode, and report the median step time, the forward FLOPs per step and the peak memory of it all."""
    memory = PeakMemory(device)
    memory.start()
    source = spec["model"] == "source"
    cfg = size.dit_config() if source else size.l2p_config(spec["patch"])
    dit = build_dit(cfg, device, dtype)
    vae = build(lambda: model.FluxVAE(size.vae_config()), device, dtype, seed=1) if source else None
    scale = 8 if source else 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, cfg.in_channels, spec["pixels"] // scale, spec["pixels"] // scale, generator=g).to(device)
    cap = torch.randn(1, size.sample_cap_len, cfg.cap_feat_dim, generator=g).to(device, dtype)
    mask = torch.ones(1, size.sample_cap_len, dtype=torch.bool, device=device)
    warm_up = device == "cuda"  # kernels load and workspaces are allocated on first use; a CPU has nothing to warm
    if warm_up:
        model.sample(dit, noise, cap, mask, steps=1, shift=SHIFT)
    step_s = []
    with FlopCounter() as flops:
        for _ in range(size.steps):  # one Euler step (DiT forward + update) at a time: the median resists hiccups
            seconds, latent = timed(lambda: model.sample(dit, noise, cap, mask, steps=1, shift=SHIFT), device)
            step_s.append(seconds)
    row = {**spec, "step_s": statistics.median(step_s), "step_s_all": step_s,
           "gflop_per_step": flops.forward_total / size.steps / 1e9,
           "dit_params": sum(p.numel() for p in dit.parameters())}
    if source:
        row["vae_params"] = sum(p.numel() for p in vae.parameters())
        limit = 2**31 if device == "cuda" else 2**62  # CPU kernels index with 64 bits
        try:
            with torch.no_grad():
                if warm_up:
                    decode_in_bands(vae, latent, limit)  # its activations count towards the peak like the timed one's
                row["decode_s"], (_, row["decode_bands"]) = timed(lambda: decode_in_bands(vae, latent, limit), device)
        except Exception as e:  # noqa: BLE001 -- e.g. a 4096^2 x 128-channel map past a kernel's 2^31 limit
            row["decode_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            free_device_memory(device)
    row["peak_bytes"] = memory.peak()
    return row


def decode_in_bands(vae: model.FluxVAE, latent: torch.Tensor, limit: int = 2**31) -> tuple[torch.Tensor, int]:
    """(image, bands): the VAE decode, in the fewest bands of latent rows that keep its widest activation (the
    second-level width at full resolution: 256 x 4096 x 4096 = 2^32 elements at 4K) under `limit` elements. CUDA
    kernels (GroupNorm, nearest upsampling, cuDNN convolutions without a batch to split) index with 32 bits, so a
    full 4K decode needs bands there, as diffusers' tiled decode does; the bands see no context across their edges,
    which changes the pixels, not the cost."""
    B, _, h, w = latent.shape
    widest = B * vae.cfg.block_out_channels[1] * (h * vae.downscale) * (w * vae.downscale)
    bands = 1
    while widest / bands >= limit and h % (2 * bands) == 0:
        bands *= 2
    if bands == 1:
        return vae.decode(latent), 1
    return torch.cat([vae.decode(part) for part in latent.chunk(bands, dim=2)], dim=2), bands


def sampling_summary(rows: list[dict]) -> dict:
    out = {}
    for name, _, _ in OUTPUT_SIZES:
        pair = {r["model"]: r for r in rows if r["output"] == name and "error" not in r}
        if len(pair) == 2:
            l2p, src = pair["L2P"], pair["source"]
            out[name] = {"time_per_step_ratio": l2p["step_s"] / src["step_s"],
                         "peak_memory_ratio": l2p["peak_bytes"] / src["peak_bytes"],
                         "flop_per_step_ratio": l2p["gflop_per_step"] / src["gflop_per_step"],
                         "source_decode_bands": src.get("decode_bands", 1)}
    return out


def sampling_scaling_note(size: BenchSize, real: bool) -> str:
    if real:
        return "real size: the published Z-Image DiT, FLUX VAE and Detailer Heads, random weights"
    return (f"scaled: DiT dim {size.dim} ({size.n_heads} heads of {size.dim // size.n_heads}), "
            f"{size.n_layers}+{size.n_refiner_layers}+{size.n_refiner_layers} layers; output sizes / "
            f"{size.pixel_divisor} (so every token count / "
            f"{size.pixel_divisor ** 2}: L2P {64 // size.pixel_divisor}x{64 // size.pixel_divisor} tokens at every "
            f"size, the source 4x more per doubling, as at real size); Detailer Head and VAE widths / "
            f"{size.width_divisor}; caption {size.sample_cap_len} tokens. Sizes are named by the real output they "
            f"stand for")


def sampling_table(r: dict) -> str:
    lines = ["### 2. Sampling: time per denoising step and peak memory, L2P vs the source LDM (+ VAE decode)",
             r["scaling"], f"peak memory: {r['memory_method']}", "",
             "| output | model | pixels | image tokens | patch | GFLOP/step | time/step (s) | VAE decode (s) | "
             "peak memory (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['output']} | {row['model']} | {row['pixels']}^2 | {row['tokens']} | {row['patch']} "
                         f"| - | - | - | {row['error']} |")
            continue
        decode = f"{row['decode_s']:.3f}" if "decode_s" in row else row.get("decode_error", "-")
        if row.get("decode_bands", 1) > 1:
            decode += f" ({row['decode_bands']} row bands: 32-bit kernel indexing)"
        lines.append(f"| {row['output']} | {row['model']} | {row['pixels']}^2 | {row['tokens']} | {row['patch']} | "
                     f"{row['gflop_per_step']:.1f} | {row['step_s']:.4f} | {decode} | "
                     f"{row['peak_bytes'] / 2**20:.0f} |")
    lines += ["", "| output | L2P vs source: time/step | peak memory | FLOP/step |", "|---|---|---|---|"]
    for name, s in r["summary"].items():
        banded = f" (source decode in {s['source_decode_bands']} bands)" if s["source_decode_bands"] > 1 else ""
        lines.append(f"| {name} | {100 * (s['time_per_step_ratio'] - 1):+.2f}% | "
                     f"{100 * (s['peak_memory_ratio'] - 1):+.2f}%{banded} | "
                     f"{100 * (s['flop_per_step_ratio'] - 1):+.2f}% |")
    lines.append(f"| 4K, paper (GPU) | {100 * (PAPER_4K['time_per_step_ratio'] - 1):+.2f}% | "
                 f"{100 * (PAPER_4K['peak_memory_ratio'] - 1):+.2f}% | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 3. Training: one L2P train step at 1024^2
# ----------------------------------------------------------------------------------------------------------------


def write_training_inputs(folder: Path, cfg: model.ZImageConfig, size: BenchSize, pixels: int, dtype: torch.dtype):
    """A random L2P init in the released layout (made on the device, tensor by tensor) and a few random images with
    cached caption features: what train.py reads."""
    with torch.device("meta"):
        specs = {k: v.to(dtype) for k, v in model.ZImageDiT(cfg).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)

    def tensors():
        for key, spec in specs.items():
            t = torch.randn(spec.shape, generator=g, device=device)
            t = 1 + 0.1 * t if spec.ndim == 1 and "norm" in key else t * 0.5 / math.sqrt(spec[0].numel())
            yield key, t.to(dtype).cpu()

    model.write_safetensors(folder / "init.safetensors", tensors(), {"format": "l2p"}, specs=specs)
    rows = []
    for i in range(2 * size.train_batch):
        image = torch.rand(1, 3, pixels, pixels, generator=torch.Generator().manual_seed(i)) * 2 - 1
        model.save_png(folder / f"{i}.png", model.to_uint8(image)[0])
        cap = torch.randn(size.sample_cap_len, cfg.cap_feat_dim, generator=torch.Generator().manual_seed(i))
        model.write_caption_features(model.caption_features_path(folder, f"prompt {i}"), cap, f"prompt {i}")
        rows.append({"file_name": f"{i}.png", "prompt": f"prompt {i}",
                     "features": model.caption_features_path(folder, f"prompt {i}").name})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_training(spec: dict, size: BenchSize, device: str, dtype: torch.dtype) -> dict:
    """train.py's own step (its loop, its memory mode, its optimizer), a few steps on random weights and data, run
    through train.main; time per step and peak memory from its log, model FLOPs counted on a forward of the same
    network under the same freeze policy."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train

    cfg, B, px = size.l2p_config(spec["patch"]), size.train_batch, spec["pixels"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_training_inputs(work, cfg, size, px, dtype)
        memory = PeakMemory(device)
        memory.start()
        host = PeakMemory("cpu")
        host.start()
        train.main(["--init", str(work / "init.safetensors"), "--data", str(work), "--out", str(work / "run"),
                    "--max-steps", str(size.train_steps + 1), "--batch-size", str(B), "--res", str(px),
                    "--train-blocks", str(size.train_blocks), "--device", device, "--workers", "0",
                    "--dtype", {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], "--log-every", "1",
                    "--sample-every", "0", "--save-every", str(10 ** 9),
                    "--low-memory" if spec["mode"] == "low-memory" else "--no-low-memory"])
        log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
        peak_bytes, peak_host_bytes = memory.peak(), host.peak()
    plan = next(r for r in log if r.get("event") == "plan")
    steps = [r["step_s"] for r in log if "step_s" in r][1:]  # the first step warms up (allocations, kernels)
    net = build_dit(cfg, device, dtype)
    trainable, frozen = model.set_trainable(net, size.train_blocks)
    g = torch.Generator().manual_seed(0)
    with FlopCounter() as flops, torch.no_grad():
        net(torch.rand(B, 3, px, px, generator=g).to(device, dtype), torch.rand(B), torch.randn(
            B, size.sample_cap_len, cfg.cap_feat_dim, generator=g).to(device, dtype),
            torch.ones(B, size.sample_cap_len, dtype=torch.bool, device=device))
    step_s = statistics.median(steps)
    return {**spec, "batch": B, "micro_batch": plan["micro_batch"], "trainable_params": trainable,
            "frozen_params": frozen, "step_s": step_s, "images_per_s": B / step_s,
            "train_tflop_per_step": flops.train_step / 1e12, "forward_flops_by_kind": flops.flops,
            "achieved_tflops": flops.train_step / step_s / 1e12, "peak_bytes": peak_bytes,
            "peak_host_bytes": peak_host_bytes, "plan_gpu_bytes": plan["plan"]["gpu_total"],
            "plan_host_bytes": plan["plan"]["host_total"], "losses": [r["loss"] for r in log if "step_s" in r]}


def training_table(r: dict) -> str:
    lines = ["### 3. Training: train.py's own step, standard and low-memory mode (set_trainable default, gradient "
             "checkpointing, fp32 masters, AdamW)",
             r["scaling"], f"peak memory: {r['memory_method']}",
             f"MFU = model FLOPs per step / step time / measured peak {r['matmul_peak_tflops']:.2f} TFLOP/s "
             f"({r['dtype']} {r['matmul_n']}^3 matmul). Model FLOPs: 6 x params x tokens for trainable "
             f"layers, 4 x for frozen ones (forward + input gradient), 3 x the forward attention products; "
             f"the checkpoint recompute is not counted", "",
             "| mode | pixels | batch | trainable / frozen params (M) | step (s) | images/s | TFLOP/step | "
             "achieved TFLOP/s | MFU | peak memory (MB) | plan (MB) | peak host (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['mode']} | {row.get('pixels', '-')}^2 | - | - | - | - | - | - | - | - | - | "
                         f"{row['error']} |")
            continue
        plan = row["plan_gpu_bytes"] + (row["plan_host_bytes"] if row["device"] == "cpu" else 0)
        lines.append(f"| {row['mode']} | {row['pixels']}^2 | {row['batch']} | {row['trainable_params'] / 1e6:.1f} / "
                     f"{row['frozen_params'] / 1e6:.1f} | {row['step_s']:.3f} | {row['images_per_s']:.3f} | "
                     f"{row['train_tflop_per_step']:.4f} | {row['achieved_tflops']:.3f} | {100 * row['mfu']:.1f}% | "
                     f"{row['peak_bytes'] / 2**20:.0f} | {plan / 2**20:.0f} | {row['peak_host_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Running configurations: in this process (CUDA) or one fresh process each (CPU memory)
# ----------------------------------------------------------------------------------------------------------------

RUNNERS = {"sampling": run_sampling, "training": run_training}


def run_config(spec: dict, args, fresh_process: bool = False) -> dict:
    size, dtype = SIZES[args.size], DTYPES[args.dtype]
    if (args.device == "cuda" or args.in_process) and not fresh_process:
        try:
            return RUNNERS[spec["section"]](spec, size, args.device, dtype)
        except Exception as e:  # noqa: BLE001 -- out of memory, say: the other rows still run
            traceback.print_exc()
            return {**spec, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        finally:
            free_device_memory(args.device)
    worker = {"spec": spec, "size": args.size, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "clock": args.clock}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(worker)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**spec, "error": f"worker failed: {tail[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_main(payload: str):
    global clock
    job = json.loads(payload)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    clock = CLOCKS[job.get("clock", "wall")]
    row = RUNNERS[job["spec"]["section"]](job["spec"], SIZES[job["size"]], job["device"], DTYPES[job["dtype"]])
    print(json.dumps(row))


def memory_method(device: str, in_process: bool) -> str:
    if device == "cuda":
        return "torch.cuda.max_memory_allocated minus what was allocated before the configuration was built"
    if in_process:
        return ("--in-process: resident-set high-water mark growth within this process; earlier rows' freed heap "
                "stays resident, so later rows are under-counted (use the default one process per row)")
    return ("one fresh process per row: resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) minus "
            "the resident set before anything was built = weights + activations + allocator overhead")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available)")
    parser.add_argument("--size", choices=list(SIZES),
                        help="real: the published sizes (GPU); small: scaled down for a CPU; tiny: a smoke test "
                             "(default: real on cuda, small on cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights and activations (default: bf16 on cuda, "
                                                              "fp32 on cpu)")
    parser.add_argument("--sections", default="dit,sampling,training",
                        help="comma-separated subset of dit, sampling, training, run in that order")
    parser.add_argument("--batch", type=int, default=1,
                        help="section 1 batch (DiffSynth's Z-Image-Turbo forward takes batch 1 only)")
    parser.add_argument("--reps", type=int, help="section 1 interleaved timed rounds (default: 7 real, 9 small)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time (default); process: CPU time of this process, all threads (CPU "
                             "only; with --threads 1 it resists other processes sharing the cores)")
    parser.add_argument("--compare-model", help="a model.py to time as a fourth implementation in section 1 (e.g. a "
                                                "patched copy), on the same weights")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: run sections 2-3 in this process instead of one fresh process per row (faster; "
                             "peak memory then not isolated between rows)")
    parser.add_argument("--out", help="JSON output path (default: bench/results/speed-<device>.json)")
    parser.add_argument("--worker", help="internal: run one configuration (a JSON job) in this process and print "
                                         "its result as JSON; the CPU memory measurement uses one process per row")
    args = parser.parse_args(argv)
    args.size = args.size or ("real" if args.device == "cuda" else "small")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"dit", "sampling", "training"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    if args.device == "cuda" and args.clock == "process":
        parser.error("--clock process measures CPU time: GPU work would not count")
    args.out = Path(args.out or Path(__file__).resolve().parent / "results" / f"speed-{args.device}.json")
    return args


def main(argv=None) -> dict:
    global clock
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    size, dtype, device = SIZES[args.size], DTYPES[args.dtype], args.device
    if args.reps:
        size = replace(size, reps=args.reps)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    start = time.perf_counter()
    result = {"meta": {"device": device, "device_name": device_name(device), "torch": torch.__version__,
                       "diffusers": package_version("diffusers"), "diffsynth": package_version("diffsynth"),
                       "python": platform.python_version(), "size": args.size, "dtype": args.dtype,
                       "threads": torch.get_num_threads(), "clock": args.clock,
                       "load_average_start": os.getloadavg()[0],
                       "size_config": asdict(size), "command": " ".join(sys.argv)}}
    print(f"# bench/speed.py: {result['meta']['device_name']}, torch {torch.__version__}, --size {args.size}, "
          f"{args.dtype}, {args.clock} clock, load average {os.getloadavg()[0]:.1f}\n")
    peak = matmul_peak_flops(device, dtype, size.matmul_n)
    result["matmul_peak"] = {"tflops": peak / 1e12, "n": size.matmul_n, "dtype": args.dtype}
    print(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s ({args.dtype}, {size.matmul_n}^3)\n")

    for section in args.sections:
        run_section(section, args, result, size, dtype, peak, start)
    save(result, args.out, start)
    print(f"wrote {args.out} ({result['meta']['seconds']:.0f} s)")
    return result


def run_section(section: str, args, result: dict, size: BenchSize, dtype: torch.dtype, peak: float, start: float):
    device = args.device
    if section == "dit":
        result["dit"] = bench_dit(size, device, dtype, args.batch, args.compare_model)
        print(dit_table(result["dit"]) + "\n", flush=True)
        free_device_memory(device)
        result["dit_flux2"] = bench_dit(size, device, dtype, args.batch, family="flux2")
        print(dit_table(result["dit_flux2"]) + "\n", flush=True)
        free_device_memory(device)

    scaling = sampling_scaling_note(size, args.size == "real")
    if section == "sampling":
        rows = [run_config(spec, args) for spec in sampling_configs(size)]
        result["sampling"] = {"scaling": scaling, "memory_method": memory_method(device, args.in_process),
                              "rows": rows, "summary": sampling_summary(rows), "paper_4k": PAPER_4K}
        print(sampling_table(result["sampling"]) + "\n", flush=True)

    if section == "training":
        name, real_px, patch = OUTPUT_SIZES[0]
        rows = []
        for mode in ("standard", "low-memory"):
            spec = dict(section="training", mode=mode, output=name, pixels=real_px // size.pixel_divisor, patch=patch,
                        device=device)
            rows.append(run_config(spec, args, fresh_process=True))  # train.py's memory, isolated per mode
            if "error" not in rows[-1]:
                rows[-1]["mfu"] = rows[-1]["achieved_tflops"] * 1e12 / peak
        result["training"] = {"scaling": scaling, "memory_method": memory_method(device, args.in_process),
                              "rows": rows, "matmul_peak_tflops": peak / 1e12, "matmul_n": size.matmul_n,
                              "dtype": args.dtype}
        print(training_table(result["training"]) + "\n", flush=True)
    save(result, args.out, start)


def save(result: dict, out: Path, start: float):
    """Write the JSON (after every section too, so that a run stopped midway keeps what it measured)."""
    result["meta"]["seconds"] = time.perf_counter() - start
    result["meta"]["load_average_end"] = os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
