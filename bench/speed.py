"""
Speed and memory of l2p's networks: our DiTs against diffusers', and L2P against its latent source (the paper's "4K
and beyond": -97.67% time per step, -38.81% peak memory at 4096^2).

    python bench/speed.py --device cpu --size small         # scaled down, a few minutes on a laptop CPU
    python bench/speed.py --device cuda --size real         # real-size random weights in bf16, one GPU

Sections (each prints a markdown table; everything lands in one JSON file, --out)
  1. DiT       forward and forward+backward time of model.ZImageDiT and model.Flux2DiT against diffusers' on the
               same Parameter objects, runs interleaved A B A B ..., medians, ratio ours / theirs
  2. Sampling  time and FLOPs per denoising step and peak memory of L2P (64x64 tokens at every size: patch 16 / 32 /
               64 at 1K / 2K / 4K) against the source LDM at the same output size (VAE x8 + patch 2: 4,096 / 16,384 /
               65,536 tokens) plus its VAE decode (on CUDA in row bands past 2^31 elements); batch 1, no CFG batch
  3. Training  train.py's own step at 1024^2, standard and low-memory mode (train.main on random weights and data):
               images/s, model FLOP utilisation, peak GPU memory against train.py's plan, peak host memory

Sizes: real = the published Z-Image (dim 3840, 30 layers); small and tiny scale widths, depths, caption lengths and
output sizes down and keep the ratios that decide the comparisons (see SIZES and the notes printed with each table).
FLOPs: torch.utils.flop_counter, from the shapes each matmul, convolution and attention sees (in an untimed step).
Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the resident-set high-water mark (VmHWM,
reset through /proc/self/clear_refs), each configuration in a fresh process: weights + activations + allocator
overhead. diffusers is a benchmark-only extra (bench/requirements.txt); without it section 1 times ours alone.
"""

import argparse
import contextlib
import ctypes
import gc
import importlib.metadata
import inspect
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import train  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the paper's 4K figure (GPU not named): source LDM vs L2P
PAPER_4K = {"source": {"time_per_step_s": 51.14, "peak_memory_gb": 43.78}, "L2P": {"time_per_step_s": 1.19,
            "peak_memory_gb": 26.79}, "time_per_step_ratio": 1.19 / 51.14, "peak_memory_ratio": 26.79 / 43.78}
# output sizes of the sampling comparison at real scale: (name, pixels per side, L2P patch)
OUTPUT_SIZES = (("1K", 1024, 16), ("2K", 2048, 32), ("4K", 4096, 64))
SHIFT = 3.0


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
    steps: int               # section 2: timed denoising steps per row (median, after an untimed one)
    train_batch: int
    train_steps: int         # section 3: timed train steps (after one warm-up step)
    matmul_n: int            # side of the square matmul that measures the device's peak

    def dit_config(self, n_layers: int | None = None) -> model.ZImageConfig:
        head = self.dim // self.n_heads  # Z-Image's RoPE split (32, 48, 48) of 128, scaled for smaller heads
        return model.ZImageConfig(dim=self.dim, n_heads=self.n_heads, n_layers=n_layers or self.n_layers,
                                  n_refiner_layers=self.n_refiner_layers, cap_feat_dim=self.cap_feat_dim,
                                  axes_dims=(head // 4, head * 3 // 8, head - head // 4 - head * 3 // 8))

    def flux2_config(self) -> model.Flux2Config:
        """FLUX.2 [klein] at this size: 1 double-stream block per 4 single-stream (klein: 5 + 20), heads of 128."""
        singles, wide = max(1, self.dit_layers * 2 // 3), self.dim >= 128
        return model.Flux2Config(num_layers=max(1, singles // 4), num_single_layers=singles,
                                 num_attention_heads=self.dim // 128 if wide else 2,
                                 attention_head_dim=128 if wide else self.dim // 2,
                                 joint_attention_dim=3 * self.cap_feat_dim,
                                 axes_dims_rope=((32,) if wide else (self.dim // 8,)) * 4)

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
    # L2P keeps 16x16 tokens at every size, the source's grow 4x per doubling (256 .. 4,096), as at real size;
    # Detailer Head and VAE widths / 8; caption 12 tokens (real ~200, / 16)
    "small": BenchSize(dim=384, n_heads=3, n_layers=30, n_refiner_layers=2, cap_feat_dim=256, train_blocks=5,
                       dit_layers=6, dit_grid=32, dit_cap_len=100, pixel_divisor=4, sample_cap_len=12,
                       width_divisor=8, reps=9, steps=3, train_batch=2, train_steps=3, matmul_n=2048),
    # smoke-test scale: every code path in seconds; numbers mean nothing
    "tiny": BenchSize(dim=64, n_heads=2, n_layers=4, n_refiner_layers=1, cap_feat_dim=32, train_blocks=1,
                      dit_layers=2, dit_grid=8, dit_cap_len=20, pixel_divisor=16, sample_cap_len=4,
                      width_divisor=8, reps=2, steps=1, train_batch=1, train_steps=1, matmul_n=256),
}


def timed(fn, device: str):
    """(seconds, result) of fn(), the device synchronised on both ends."""
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def memory_tracker(device: str):
    """A function returning the peak bytes allocated since this call: CUDA's counter, or on CPU the growth of the
    resident-set high-water mark (measure in a fresh process: freed heap pages stay resident, hiding allocations)."""
    status = lambda field: 1024 * int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()  # noqa
                                           if ln.startswith(field + ":")).split()[1])
    free_device_memory(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        return lambda: torch.cuda.max_memory_allocated() - base
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap pages back, so that reuse shows
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # an old kernel: VmHWM then holds the import-time peak too (over-estimate)
        Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    return lambda: status("VmHWM") - base


def free_device_memory(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), None)
    return f"{cpu or platform.processor()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads)"


def package_version(name: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """The device's dense matmul throughput in FLOP/s: best of `reps` n x n x n products after two warm-ups."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b, a @ b  # warm-ups
    return 2 * n ** 3 / min(timed(lambda: a @ b, device)[0] for _ in range(reps))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter. Its table lacks the CPU attention kernel (it would count 0): that one gets the formulas
    of the CUDA kernels. Its per-op dispatch costs time: count outside the timed runs."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)})


@torch.no_grad()
def build(make, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """make() on the meta device, then its weights in `dtype` on `device`, random (norm weights around 1, matrices
    ~ 0.5 / sqrt(fan_in), vectors small), drawn on the device so that billions of parameters take a second on a GPU."""
    with torch.device("meta"):
        module = make()
    module = module.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
        if p.ndim == 1 and "norm" in name:
            p.copy_(1 + 0.1 * noise)
        elif p.ndim > 1 and "pad_token" not in name:
            p.copy_(noise * 0.5 * p[0].numel() ** -0.5)
        else:
            p.copy_(0.1 * noise)
    return module.eval()


def table(columns: list[tuple], rows: list[dict]) -> list[str]:
    """Markdown lines. A cell is a format string over the row's keys or a function of the row; a cell whose keys the
    row lacks is "-", and a row's "error" takes the last column."""
    def cell(fmt, row):
        with contextlib.suppress(KeyError):
            return fmt(row) if callable(fmt) else fmt.format_map(row)
        return "-"
    return [f"| {' | '.join(h for h, _ in columns)} |", "|" + "---|" * len(columns)] + [
        f"| {' | '.join([cell(f, r) for _, f in columns[:-1]] + [r.get('error') or cell(columns[-1][1], r)])} |"
        for r in rows]


def error_line(e: Exception, n: int = 200) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:n]}"


# ----------------------------------------------------------------------------------------------------------------
# 1. DiT: ours vs diffusers, on the same Parameter objects
# ----------------------------------------------------------------------------------------------------------------


def diffusers_reference(ours: torch.nn.Module, cfg, x, sigma, cap, mask):
    """(callable returning v = eps - x0 fp32 [B, C, H, W], note): diffusers' DiT on our Parameter objects."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, ZImageTransformer2DModel
    flux2 = isinstance(cfg, model.Flux2Config)
    with torch.device("meta"):
        if flux2:  # l2p's own config fields left out
            known = inspect.signature(Flux2Transformer2DModel.__init__).parameters
            ref = Flux2Transformer2DModel(patch_size=1, guidance_embeds=False, **{
                k: v for k, v in asdict(cfg).items() if k in known and k != "patch_size"})
        else:
            ref = ZImageTransformer2DModel(
                all_patch_size=(cfg.patch_size,), all_f_patch_size=(1,), in_channels=cfg.in_channels, dim=cfg.dim,
                n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_heads, norm_eps=cfg.norm_eps, qk_norm=True, cap_feat_dim=cfg.cap_feat_dim,
                rope_theta=cfg.rope_theta, t_scale=cfg.t_scale, axes_dims=list(cfg.axes_dims),
                axes_lens=[1536, 512, 512])
    ref.load_state_dict(ours.state_dict(keep_vars=True), strict=True, assign=True)
    note = f"diffusers {package_version('diffusers')} {type(ref).__name__}"
    if flux2:  # tokens and position ids as Flux2KleinPipeline makes them; its output is v
        tokens, ids, txt_ids = x.flatten(2).transpose(1, 2), Flux2KleinPipeline._prepare_latent_ids(x), \
            Flux2KleinPipeline._prepare_text_ids(cap)
        return lambda: ref(hidden_states=tokens, encoder_hidden_states=cap, timestep=sigma, img_ids=ids, guidance=None,
                           txt_ids=txt_ids, return_dict=False)[0].transpose(1, 2).reshape(x.shape).float(), note
    # Z-Image: per-sample lists with a frames axis, t = 1 - sigma; its output is x0 - eps
    images, caps = [xi.unsqueeze(1) for xi in x], [c[m] for c, m in zip(cap, mask)]
    return lambda: -torch.stack([o.squeeze(1) for o in ref(images, 1 - sigma, caps, return_dict=False)[0]]).float(), \
        note


def bench_dit(size: BenchSize, device: str, dtype: torch.dtype, batch: int, family: str = "zimage") -> dict:
    if family == "flux2":  # FLUX.2 attends to all 512 caption positions (pads included): 512 at real size
        cfg, cap_len = size.flux2_config(), 512 // size.pixel_divisor
        description = (f"FLUX.2 [klein] layout: dim {cfg.dim}, {cfg.num_attention_heads} heads of "
                       f"{cfg.attention_head_dim}, {cfg.num_layers} double + {cfg.num_single_layers} single blocks")
    else:
        cfg, cap_len = size.dit_config(size.dit_layers), size.dit_cap_len
        description = (f"Z-Image layout: dim {cfg.dim}, {cfg.n_heads} heads of {cfg.dim // cfg.n_heads}, "
                       f"{cfg.n_layers} layers + {cfg.n_refiner_layers}+{cfg.n_refiner_layers} refiners")
    ours, g = build(lambda: model.new_model(cfg), device, dtype), torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, *[size.dit_grid * cfg.patch_size] * 2, generator=g).to(device, dtype)
    sigma = torch.rand(batch, generator=g).to(device)
    cap = torch.randn(batch, cap_len, cfg.cap_feat_dim, generator=g).to(device, dtype)
    mask = torch.ones(batch, cap_len, dtype=torch.bool, device=device)
    runners, errors = {"ours": (lambda: ours(x, sigma, cap, mask), f"model.{type(ours).__name__} (model.py)")}, {}
    try:
        runners["diffusers"] = diffusers_reference(ours, cfg, x, sigma, cap, mask)
    except Exception as e:  # noqa: BLE001 -- not installed, or it does not build: a result to report
        errors["diffusers"] = f"{type(e).__name__}: {e}"
    params, forward = list(ours.parameters()), torch.no_grad()(lambda run: run())

    def forward_backward(run):
        run().square().mean().backward()
        for p in params:
            p.grad = None

    phases, results = {"forward": forward, "forward_backward": forward_backward}, {}
    for name, (run, note) in runners.items():  # warm-up round, also checks that they agree
        try:
            v = forward(run)
            forward_backward(run)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory at real size: report it, time the others
            errors[name] = error_line(e)
            free_device_memory(device)
            continue
        results[name] = {"implementation": note, "forward_s": [], "forward_backward_s": []}
        if name == "ours":
            reference = v
        elif "ours" in results:
            results[name]["rel_diff_vs_ours"] = ((v - reference).norm() / reference.norm()).item()
    for phase, fn in phases.items():
        for _ in range(size.reps):  # A B A B ...
            for name, r in results.items():
                r[f"{phase}_s"].append(timed(lambda: fn(runners[name][0]), device)[0])
    ratios, paired_ratios = {}, {}
    for name, r in results.items():
        for phase in phases:
            r[f"{phase}_median_s"], r[f"{phase}_min_s"] = statistics.median(r[f"{phase}_s"]), min(r[f"{phase}_s"])
        if name != "ours" and "ours" in results:
            ours_r = results["ours"]
            ratios[f"ours/{name}"] = {p: ours_r[f"{p}_median_s"] / r[f"{p}_median_s"] for p in phases}
            # the median over rounds of ours / theirs in the same round: load that drifts between rounds cancels
            paired_ratios[f"ours/{name}"] = {p: statistics.median(a / b for a, b in zip(ours_r[f"{p}_s"],
                                                                                        r[f"{p}_s"])) for p in phases}
    n_img = size.dit_grid ** 2
    sequence = n_img + cap_len if family == "flux2" else model.round_up(n_img) + model.round_up(cap_len)
    return {"family": family, "config": {**asdict(cfg), "n_params": sum(p.numel() for p in params),
                                         "description": description},
            "inputs": {"batch": batch, "image_tokens": n_img, "caption_tokens": cap_len, "sequence": sequence,
                       "dtype": str(dtype), "rounds": size.reps},
            "implementations": results, "unavailable": errors, "ratios": ratios, "paired_ratios": paired_ratios}


def dit_table(r: dict) -> str:
    cfg, inp = r["config"], r["inputs"]
    rows = [{**res, "name": name, **r["ratios"].get(f"ours/{name}", {})} for name, res in r["implementations"].items()]
    rows += [{"name": name, "implementation": "not measured", "error": err} for name, err in r["unavailable"].items()]
    paired = ", ".join(f"{name.split('/')[1]} {q['forward']:.3f} / {q['forward_backward']:.3f}"
                       for name, q in r["paired_ratios"].items())
    return "\n".join([
        f"### 1. {'FLUX.2' if r['family'] == 'flux2' else 'Z-Image'} DiT: ours vs the references (same config, same "
        f"Parameter objects, interleaved, median of {inp['rounds']})",
        f"config: {cfg['description']}, {cfg['n_params'] / 1e6:.1f}M params; batch {inp['batch']}, "
        f"{inp['image_tokens']} image tokens + {inp['caption_tokens']} caption tokens (sequence {inp['sequence']}), "
        f"{inp['dtype']}", "",
        *table([("implementation", "{name}: {implementation}"), ("forward (s)", "{forward_median_s:.4f}"),
                ("fwd+bwd (s)", "{forward_backward_median_s:.4f}"), ("ours / it, forward", "{forward:.3f}"),
                ("ours / it, fwd+bwd", "{forward_backward:.3f}"), ("rel. diff of v vs ours", "{rel_diff_vs_ours:.1e}")],
               rows),
        *(["", f"ours / it, median over rounds of the same-round ratio (forward / fwd+bwd; robust to load that drifts "
               f"between rounds): {paired}"] if paired else [])])


# ----------------------------------------------------------------------------------------------------------------
# 2. Sampling: L2P vs the source LDM + VAE decode, 1K / 2K / 4K
# ----------------------------------------------------------------------------------------------------------------


def sampling_configs(size: BenchSize) -> list[dict]:
    p = model.ZIMAGE_LATENT_PATCH  # the source: VAE x8 times its latent patch per token side
    return [dict(section="sampling", output=name, model=kind, pixels=px // size.pixel_divisor, patch=patch,
                 tokens=(px // size.pixel_divisor // side) ** 2)
            for name, px, l2p_patch in OUTPUT_SIZES for kind, patch, side in (("source", p, 8 * p),
                                                                               ("L2P", l2p_patch, l2p_patch))]


def run_sampling(spec: dict, size: BenchSize, device: str, dtype: torch.dtype) -> dict:
    """One row: the DiT (+ VAE); the FLOPs of an untimed Euler step, `size.steps` timed ones, decode, peak memory."""
    peak_memory, source = memory_tracker(device), spec["model"] == "source"
    cfg = size.dit_config() if source else size.l2p_config(spec["patch"])
    dit = build(lambda: model.ZImageDiT(cfg), device, dtype)
    vae = build(lambda: model.FluxVAE(size.vae_config()), device, dtype, seed=1) if source else None
    side, g = spec["pixels"] // (vae.downscale if source else 1), torch.Generator().manual_seed(0)
    noise = torch.randn(1, cfg.in_channels, side, side, generator=g).to(device)
    cap = torch.randn(1, size.sample_cap_len, cfg.cap_feat_dim, generator=g).to(device, dtype)
    mask = torch.ones(1, size.sample_cap_len, dtype=torch.bool, device=device)
    step = lambda: model.sample(dit, noise, cap, mask, steps=1, shift=SHIFT)  # noqa: E731 -- DiT forward + update
    with flop_counter() as flops:  # also a warm-up: kernels load and workspaces are allocated on first use
        step()
    step_s, latents = zip(*(timed(step, device) for _ in range(size.steps)))  # one step at a time: medians
    row = {**spec, "step_s": statistics.median(step_s), "step_s_all": list(step_s),
           "gflop_per_step": flops.get_total_flops() / 1e9, "dit_params": sum(p.numel() for p in dit.parameters())}
    if source:
        row["vae_params"] = sum(p.numel() for p in vae.parameters())
        decode = lambda: decode_in_bands(vae, latents[-1], 2**31 if device == "cuda" else 2**62)  # noqa: E731
        with torch.no_grad():  # (CPU kernels index with 64 bits)
            if device == "cuda":  # a warm-up, whose activations count towards the peak like the timed one's
                decode()
            row["decode_s"], (_, row["decode_bands"]) = timed(decode, device)
    row["peak_bytes"] = peak_memory()
    return row


def decode_in_bands(vae: model.FluxVAE, latent: torch.Tensor, limit: int = 2**31) -> tuple[torch.Tensor, int]:
    """(image, bands): the VAE decode in the fewest bands of latent rows that keep its widest activation (256 x 4096
    x 4096 = 2^32 elements at 4K) under `limit` elements: CUDA kernels (GroupNorm, nearest upsampling, cuDNN
    convolutions) index with 32 bits. Bands see no context across their edges: other pixels, the same cost."""
    B, _, h, w = latent.shape
    widest, bands = B * vae.cfg.block_out_channels[1] * (h * vae.downscale) * (w * vae.downscale), 1
    while widest / bands >= limit and h % (2 * bands) == 0:
        bands *= 2
    if bands == 1:
        return vae.decode(latent), 1
    return torch.cat([vae.decode(part) for part in latent.chunk(bands, dim=2)], dim=2), bands


def sampling_summary(rows: list[dict]) -> dict:
    pairs = {name: {r["model"]: r for r in rows if r["output"] == name and "error" not in r}
             for name, _, _ in OUTPUT_SIZES}
    return {name: {"time_per_step_ratio": p["L2P"]["step_s"] / p["source"]["step_s"],
                   "peak_memory_ratio": p["L2P"]["peak_bytes"] / p["source"]["peak_bytes"],
                   "flop_per_step_ratio": p["L2P"]["gflop_per_step"] / p["source"]["gflop_per_step"],
                   "source_decode_bands": p["source"].get("decode_bands", 1)}
            for name, p in pairs.items() if len(p) == 2}


def sampling_table(r: dict) -> str:
    pct = lambda key: lambda s: f"{100 * (s[key] - 1):+.2f}%"  # noqa: E731
    bands = lambda row, n: f" ({n} row bands: 32-bit kernel indexing)" if n > 1 else ""  # noqa: E731
    summary = [{"output": name, **s} for name, s in r["summary"].items()] + [{"output": "4K, paper (GPU)", **PAPER_4K}]
    return "\n".join([
        "### 2. Sampling: time per denoising step and peak memory, L2P vs the source LDM (+ VAE decode)", r["scaling"],
        f"peak memory: {r['memory_method']}", "",
        *table([("output", "{output}"), ("model", "{model}"), ("pixels", "{pixels}^2"), ("image tokens", "{tokens}"),
                ("patch", "{patch}"), ("GFLOP/step", "{gflop_per_step:.1f}"), ("time/step (s)", "{step_s:.4f}"),
                ("VAE decode (s)", lambda row: f"{row['decode_s']:.3f}" + bands(row, row["decode_bands"])),
                ("peak memory (MB)", lambda row: f"{row['peak_bytes'] / 2**20:.0f}")], r["rows"]), "",
        *table([("output", "{output}"), ("L2P vs source: time/step", pct("time_per_step_ratio")),
                ("peak memory", lambda s: pct("peak_memory_ratio")(s) + bands(s, s.get("source_decode_bands", 1))),
                ("FLOP/step", pct("flop_per_step_ratio"))], summary)])


# ----------------------------------------------------------------------------------------------------------------
# 3. Training: train.py's own step at 1024^2
# ----------------------------------------------------------------------------------------------------------------


def train_step_flops(cfg: model.ZImageConfig, size: BenchSize, pixels: int, device: str, dtype: torch.dtype):
    """(FLOPs of a train step, its forward and backward FLOPs by op, (trainable, frozen) parameters): a forward and
    backward under train.py's freeze policy, so that autograd computes the gradients a step needs and no others;
    without checkpointing, whose recompute is not counted; of one sample (FLOPs grow linearly with the batch)."""
    net = build(lambda: model.ZImageDiT(cfg), device, dtype)
    params, g = model.set_trainable(net, size.train_blocks), torch.Generator().manual_seed(0)
    x, cap = torch.rand(1, 3, pixels, pixels, generator=g), torch.randn(1, size.sample_cap_len, cfg.cap_feat_dim,
                                                                        generator=g)
    with flop_counter() as forward:
        loss = net(x.to(device, dtype), torch.rand(1), cap.to(device, dtype),
                   torch.ones(1, size.sample_cap_len, dtype=torch.bool, device=device)).square().mean()
    with flop_counter() as backward:
        loss.backward()
    by_op = {phase: {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
             for phase, counter in (("forward", forward), ("backward", backward))}
    return size.train_batch * (forward.get_total_flops() + backward.get_total_flops()), by_op, params


def run_training(spec: dict, size: BenchSize, device: str, dtype: torch.dtype) -> dict:
    """train.py's own step (loop, memory mode, optimizer) on random weights and data, run through train.main."""
    cfg, B, px = size.l2p_config(spec["patch"]), size.train_batch, spec["pixels"]
    with tempfile.TemporaryDirectory() as work:
        work, rows = Path(work), []  # what train.py reads: an L2P init, images, cached caption features
        net = build(lambda: model.ZImageDiT(cfg), "cuda" if torch.cuda.is_available() else "cpu", dtype)
        model.write_safetensors(work / "init.safetensors", net.state_dict(), {"format": "l2p"})
        for i in range(2 * B):
            g, features = torch.Generator().manual_seed(i), model.caption_features_path(work, f"prompt {i}")
            model.save_png(work / f"{i}.png", model.to_uint8(torch.rand(1, 3, px, px, generator=g) * 2 - 1)[0])
            model.write_caption_features(features, torch.randn(size.sample_cap_len, cfg.cap_feat_dim, generator=g),
                                         f"prompt {i}")
            rows.append({"file_name": f"{i}.png", "prompt": f"prompt {i}", "features": features.name})
        (work / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        del net
        argv = ["--init", str(work / "init.safetensors"), "--data", str(work), "--out", str(work / "run"),
                "--max-steps", str(size.train_steps + 1), "--batch-size", str(B), "--res", str(px), "--train-blocks",
                str(size.train_blocks), "--device", device, "--workers", "0", "--dtype",
                {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], "--log-every", "1", "--sample-every", "0",
                "--save-every", str(10 ** 9), "--low-memory" if spec["mode"] == "low-memory" else "--no-low-memory"]
        peak_memory, peak_host = memory_tracker(device), memory_tracker("cpu")
        with contextlib.redirect_stdout(io.StringIO()):  # its log lines: log.jsonl has them
            train.main(argv)
        log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
        peak_bytes, peak_host_bytes = peak_memory(), peak_host()
    plan = next(r for r in log if r.get("event") == "plan")
    step_s = statistics.median([r["step_s"] for r in log if "step_s" in r][1:])  # the first step warms up
    free_device_memory(device)
    flops, by_op, (trainable, frozen) = train_step_flops(cfg, size, px, device, dtype)
    return {**spec, "batch": B, "micro_batch": plan["micro_batch"], "trainable_params": trainable,
            "frozen_params": frozen, "step_s": step_s, "images_per_s": B / step_s, "train_tflop_per_step": flops / 1e12,
            "flops_by_op": by_op, "achieved_tflops": flops / step_s / 1e12, "peak_bytes": peak_bytes,
            "peak_host_bytes": peak_host_bytes, "plan_gpu_bytes": plan["plan"]["gpu_total"],
            "plan_host_bytes": plan["plan"]["host_total"], "losses": [r["loss"] for r in log if "step_s" in r]}


def training_table(r: dict) -> str:
    mb = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
    return "\n".join([
        "### 3. Training: train.py's own step, standard and low-memory mode (set_trainable default, gradient "
        "checkpointing, fp32 masters, AdamW)", r["scaling"], f"peak memory: {r['memory_method']}",
        f"MFU = model FLOPs per step / step time / measured peak {r['matmul_peak_tflops']:.2f} TFLOP/s ({r['dtype']} "
        f"{r['matmul_n']}^3 matmul). Model FLOPs: a forward and backward of the step's network counted by "
        f"torch.utils.flop_counter (weight gradients where layers train, input gradients where a trained layer lies "
        f"below; attention's backward with its recompute of the scores); the checkpoint recompute is not counted", "",
        *table([("mode", "{mode}"), ("pixels", "{pixels}^2"), ("batch", "{batch}"),
                ("trainable / frozen params (M)", lambda r: f"{r['trainable_params'] / 1e6:.1f} / "
                                                            f"{r['frozen_params'] / 1e6:.1f}"),
                ("step (s)", "{step_s:.3f}"), ("images/s", "{images_per_s:.3f}"),
                ("TFLOP/step", "{train_tflop_per_step:.4f}"), ("achieved TFLOP/s", "{achieved_tflops:.3f}"),
                ("MFU", lambda r: f"{100 * r['mfu']:.1f}%"), ("peak memory (MB)", lambda r: mb(r["peak_bytes"])),
                ("plan (MB)", lambda r: mb(r["plan_gpu_bytes"] + r["plan_host_bytes"] * (r["device"] == "cpu"))),
                ("peak host (MB)", lambda r: mb(r["peak_host_bytes"]))], r["rows"])])


# ----------------------------------------------------------------------------------------------------------------
# Main: each row of sections 2-3 in this process (CUDA) or in a fresh one (CPU memory, and train.py's)
# ----------------------------------------------------------------------------------------------------------------

MEMORY_METHODS = {"cuda": "torch.cuda.max_memory_allocated minus what was allocated before the row was built",
                  "cpu": "one fresh process per row: the growth of its resident-set high-water mark (VmHWM)"}


def run_config(run, spec: dict, args, size: BenchSize, fresh_process: bool = False) -> dict:
    """run(spec, size, device, dtype), here (CUDA) or in a fresh process (CPU memory, and train.py's)."""
    try:
        if args.device == "cuda" and not fresh_process:
            return run(spec, size, args.device, DTYPES[args.dtype])
        with ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(torch.get_num_threads(),)) as fresh:
            return fresh.submit(run, spec, size, args.device, DTYPES[args.dtype]).result()
    except Exception as e:  # noqa: BLE001 -- out of memory, say: the other rows still run
        traceback.print_exc()
        return {**spec, "error": error_line(e, 160)}
    finally:
        free_device_memory(args.device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available)")
    parser.add_argument("--size", choices=list(SIZES), help="real: the published sizes (GPU); small: scaled down for "
                        "a CPU; tiny: a smoke test (default: real on cuda, small on cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights and activations (default: bf16 on cuda, fp32 "
                        "on cpu)")
    parser.add_argument("--sections", default="dit,sampling,training",
                        help="comma-separated subset of dit, sampling, training, run in that order")
    parser.add_argument("--batch", type=int, default=1, help="section 1 batch (default 1)")
    parser.add_argument("--reps", type=int, help="section 1 interleaved timed rounds (default: 7 real, 9 small)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", help="JSON output path (default: bench/results/speed-<device>.json)")
    args = parser.parse_args(argv)
    args.size = args.size or ("real" if args.device == "cuda" else "small")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(args.sections) - {"dit", "sampling", "training"}:
        parser.error(f"unknown sections {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    args.out = Path(args.out or Path(__file__).resolve().parent / "results" / f"speed-{args.device}.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    size, start = replace(SIZES[args.size], reps=args.reps or SIZES[args.size].reps), time.perf_counter()
    result = {"meta": {"device": device, "device_name": device_name(device), "torch": torch.__version__,
                       "diffusers": package_version("diffusers"), "python": platform.python_version(),
                       "size": args.size, "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "load_average_start": os.getloadavg()[0], "size_config": asdict(size),
                       "command": " ".join(sys.argv)}}
    print(f"# bench/speed.py: {result['meta']['device_name']}, torch {torch.__version__}, --size {args.size}, "
          f"{args.dtype}, load average {os.getloadavg()[0]:.1f}\n")
    peak = matmul_peak_flops(device, dtype, size.matmul_n)
    result["matmul_peak"] = {"tflops": peak / 1e12, "n": size.matmul_n, "dtype": args.dtype}
    print(f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s ({args.dtype}, {size.matmul_n}^3)\n")
    scaling = "real size: the published Z-Image DiT, FLUX VAE and Detailer Heads, random weights" if args.size == \
        "real" else (f"scaled: DiT dim {size.dim}, {size.n_layers}+{size.n_refiner_layers}+{size.n_refiner_layers} "
                     f"layers; output sizes / {size.pixel_divisor}, so token counts / {size.pixel_divisor ** 2}; head "
                     f"and VAE widths / {size.width_divisor}; caption {size.sample_cap_len} tokens; sizes named by the "
                     f"real output they stand for")
    for section in args.sections:
        if section == "dit":
            for key, family in (("dit", "zimage"), ("dit_flux2", "flux2")):
                result[key] = bench_dit(size, device, dtype, args.batch, family)
                print(dit_table(result[key]) + "\n", flush=True)
                free_device_memory(device)
        if section == "sampling":
            rows = [run_config(run_sampling, spec, args, size) for spec in sampling_configs(size)]
            result["sampling"] = {"scaling": scaling, "memory_method": MEMORY_METHODS[device], "rows": rows,
                                  "summary": sampling_summary(rows), "paper_4k": PAPER_4K}
            print(sampling_table(result["sampling"]) + "\n", flush=True)
        if section == "training":
            name, real_px, patch = OUTPUT_SIZES[0]
            rows = [run_config(run_training, dict(section="training", mode=mode, output=name, patch=patch,
                                                  pixels=real_px // size.pixel_divisor, device=device), args, size,
                               fresh_process=True) for mode in ("standard", "low-memory")]  # train.py's own memory
            rows = [row if "error" in row else {**row, "mfu": row["achieved_tflops"] * 1e12 / peak} for row in rows]
            result["training"] = {"scaling": scaling, "memory_method": MEMORY_METHODS[device], "rows": rows,
                                  "matmul_peak_tflops": peak / 1e12, "matmul_n": size.matmul_n, "dtype": args.dtype}
            print(training_table(result["training"]) + "\n", flush=True)
        save(result, args.out, start)  # after every section: a run stopped midway keeps what it measured
    save(result, args.out, start)
    print(f"wrote {args.out} ({result['meta']['seconds']:.0f} s)")
    return result


def save(result: dict, out: Path, start: float):
    result["meta"].update(seconds=time.perf_counter() - start, load_average_end=os.getloadavg()[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
