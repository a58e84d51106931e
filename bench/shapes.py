"""
The whole L2P recipe in miniature, on the CPU: a toy latent text-to-image model is trained on captioned shape scenes
and saved in Z-Image's published layout; then the real scripts run on it, exactly as on the 6B model:

    synth.py   the source LDM makes the training corpus (images + cached text features)
    convert.py the latent DiT becomes the pixel model (16x16 RGB patches + Detailer Head)
    train.py   only the shallow layers train (middle blocks frozen), on the synthetic corpus
    sample.py  pixel-space samples, side by side with the source

and ShapeEval (bench/shapeworld.py, a rule-based GenEval) scores ground truth, VAE reconstructions, the source, L2P
and a baseline: the same pixel architecture trained from scratch, every layer trainable, same data and steps.

    python bench/shapes.py            # quick: every stage small, <= 10 min on 2 cores, the qualitative result
    python bench/shapes.py --full     # sized to measure the claim, <= 60 min on 2 cores

Finished stages are cached under --runs with their wall time (--fresh redoes them). Output: results.md +
results.json (per-task and overall ShapeEval, trainable fraction, seconds per stage, the convergence curve: ShapeEval,
the validation loss on held-out source samples and the prompt effect, for L2P and scratch), curve.png and grid.png
(source | L2P | scratch for the same prompts and seeds). The last line printed is the JSON's path.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model  # noqa: E402
import shapeworld  # noqa: E402

SIZE = 64  # pixels; the real geometry scaled down: VAE x8 -> 8x8 latent, latent patch 2 -> 4x4 tokens = pixel patch 16


@dataclass
class Plan:
    """Every size and step count of one run (quick or full)."""
    vae_steps: int
    vae_batch: int
    vae_lr: float
    source_steps: int
    source_batch: int
    source_lr: float
    train_scenes: int  # rendered scenes the source learns from
    corpus_prompts: int  # prompts x seeds images that synth.py makes for L2P (the paper: 10k x 2)
    corpus_seeds: int
    pixel_steps: int  # train.py steps for L2P and for the scratch baseline
    pixel_batch: int
    pixel_lr: float
    head_lr_fan_in: int  # train.py --head-lr-fan-in: wide head convs learn at pixel_lr x N / fan-in
    curve_every: int
    eval_prompts: int  # distinct prompts scored per model, an equal share per task (fewer where a task has fewer)
    eval_seeds: int  # images per prompt, seeds 0, 1, ... (GenEval: 4)
    sample_steps: int
    source_cfg_w: float  # the toy source's CFG, Z-Image convention pos + w (pos - neg)
    pixel_cfg: float  # L2P convention neg + c (pos - neg)
    train_blocks: int


# Pixel lr 1e-3 with the head's wide convolutions slowed by their fan-in (--head-lr-fan-in 288): with one lr for
# everything the deepest decoder conv dies (its SiLU inputs are pushed far below zero) and the output stops depending
# on the prompt: prompt effect after 300 steps on the quick corpus 0.0003 at 1e-3 (0 at 3e-3), 0.016 with the
# fan-in rule at the same training loss (0.16), and 0.033 after 1,000 steps. Lr 3e-3 with N = 288 still goes deaf.
QUICK = Plan(vae_steps=900, vae_batch=16, vae_lr=3e-3, source_steps=600, source_batch=32, source_lr=2e-3,
             train_scenes=4000, corpus_prompts=128, corpus_seeds=2, pixel_steps=300, pixel_batch=16, pixel_lr=1e-3,
             head_lr_fan_in=288, curve_every=100, eval_prompts=24, eval_seeds=2, sample_steps=10, source_cfg_w=2.0,
             pixel_cfg=2.0, train_blocks=1)
FULL = Plan(vae_steps=2000, vae_batch=16, vae_lr=3e-3, source_steps=2500, source_batch=64, source_lr=2e-3,
            train_scenes=20000, corpus_prompts=1000, corpus_seeds=2, pixel_steps=3000, pixel_batch=16, pixel_lr=1e-3,
            head_lr_fan_in=288, curve_every=750, eval_prompts=72, eval_seeds=4, sample_steps=30, source_cfg_w=2.0,
            pixel_cfg=2.0, train_blocks=1)

TOY_DIT = model.ZImageConfig(in_channels=16, patch_size=2, dim=128, n_layers=6, n_refiner_layers=1, n_heads=4,
                             cap_feat_dim=64, axes_dims=(8, 12, 12))
TOY_VAE = model.FluxVAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
TOY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
TOY_TRAIN_SHIFT = 1.0  # the source trains on uniform sigma (16 latent tokens: the resolution rule gives a small shift)
TOY_SHIFT = 3.0  # ...but samples better with Z-Image's shift 3 (a toy source at 20 steps: 0.094 vs 0.062 at 1)
VAE_POOL = 2000  # scenes rendered once for the VAE (rendering is cheap, but not free at every step)
# The decoder learns on noisy latents, to forgive the DiT's inexact samples: with 0.25 of the latent's spread in
# training, latents with 0.4 unit of noise still decode to 0.979 ShapeEval (0.990 clean). Relative to the spread, so
# the encoder cannot outgrow the noise by scaling its output up.
VAE_LATENT_NOISE = 0.25
HEAD_WIDTH = 16  # the toy Detailer Head: the released layout with a quarter of the channels


def log(msg: str):
    print(f"[shapes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# The toy source LDM, trained here and saved in Z-Image's published layout
# ----------------------------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path):
    """A word-level tokenizer over the scene vocabulary with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
    words = ["user", "assistant", *shapeworld.caption_vocabulary()]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                "{%- endif %}{%- endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", padding_side="right", chat_template=template)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_text_encoder(folder: Path, vocab_size: int, pad_id: int, seed: int = 0):
    """A small random Qwen3 (never trained: like the real recipe, the text encoder stays frozen) in the HF layout."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=pad_id, rms_norm_eps=1e-6, **TOY_TEXT)
    text = Qwen3ForCausalLM(config)
    with torch.no_grad():
        text.model.embed_tokens.weight.normal_()
    text.save_pretrained(folder)


def write_component(folder: Path, module: torch.nn.Module, config: dict, weights_name: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model.write_safetensors(folder / weights_name, {k: v.detach().contiguous() for k, v in module.state_dict().items()})


def cosine_lr(peak: float, step: int, steps: int, warmup: int = 50) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_vae(plan: Plan, seed: int) -> model.FluxVAE:
    """FLUX's autoencoder architecture, small: reconstruction MSE + a light pull of the latent toward the origin."""
    torch.manual_seed(seed)
    vae = model.FluxVAE(replace(TOY_VAE))  # a copy: normalise_vae writes the fitted factors into vae.cfg
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pool = to_tensor(np.stack([shapeworld.render(shapeworld.make_scene(rng), SIZE) for _ in range(VAE_POOL)]))
    g = torch.Generator().manual_seed(seed)
    for step in range(plan.vae_steps):
        x = pool[torch.randint(len(pool), (plan.vae_batch,), generator=g)]
        mean = vae.encoder(x)[:, :TOY_VAE.latent_channels]
        z = mean + VAE_LATENT_NOISE * mean.detach().std() * torch.randn_like(mean)
        loss = F.mse_loss(vae.decoder(z), x) + 1e-4 * mean.square().mean()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(plan.vae_lr, step, plan.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == plan.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def normalise_vae(vae: model.FluxVAE, seed: int):
    """Z-Image's latent normalisation, (mean - shift) * scale, fitted to this VAE: zero mean, unit variance."""
    rng = np.random.default_rng(seed + 1)
    x = to_tensor(np.stack([shapeworld.render(shapeworld.make_scene(rng), SIZE) for _ in range(256)]))
    mean = vae.encoder(x)[:, :TOY_VAE.latent_channels]
    vae.cfg.shift_factor = float(mean.mean())
    vae.cfg.scaling_factor = float(1 / mean.std())


def encode_captions(text, captions: list[str], batch: int = 256) -> dict[str, torch.Tensor]:
    """Distinct caption -> its valid feature rows [L, D] (the DiT sees exactly what the text encoder gives it)."""
    out = {}
    unique = list(dict.fromkeys(captions))
    for i in range(0, len(unique), batch):
        cap, mask = text.encode(unique[i:i + batch])
        for caption, c, m in zip(unique[i:i + batch], cap, mask):
            out[caption] = c[m].clone()
    return out


def pad_captions(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(r.shape[0] for r in rows)
    cap = torch.stack([F.pad(r, (0, 0, 0, L - r.shape[0])) for r in rows])
    mask = torch.arange(L)[None, :] < torch.tensor([r.shape[0] for r in rows])[:, None]
    return cap, mask


def train_source_dit(plan: Plan, vae: model.FluxVAE, text, seed: int) -> model.ZImageDiT:
    """The toy Z-Image DiT, trained by flow matching on the VAE's latents (10% empty captions, for CFG)."""
    rng = np.random.default_rng(seed + 2)
    scenes = [shapeworld.make_scene(rng) for _ in range(plan.train_scenes)]
    features = encode_captions(text, [s.caption for s in scenes] + [""])
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_tensor(np.stack([shapeworld.render(s, SIZE) for s in scenes[i:i + 256]])))
                             for i in range(0, len(scenes), 256)])
    torch.manual_seed(seed)
    dit = model.ZImageDiT(TOY_DIT)
    opt = torch.optim.AdamW(dit.parameters(), lr=plan.source_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(plan.source_steps):
        idx = torch.randint(len(scenes), (plan.source_batch,), generator=g)
        drop = torch.rand(plan.source_batch, generator=g) < 0.1
        cap, mask = pad_captions([features[""] if d else features[scenes[i].caption]
                                  for i, d in zip(idx.tolist(), drop)])
        x0 = latents[idx]
        u = torch.randint(1, 1001, (plan.source_batch,), generator=g) / 1000
        sigma = TOY_TRAIN_SHIFT * u / (1 + (TOY_TRAIN_SHIFT - 1) * u)
        eps = torch.randn(x0.shape, generator=g)
        x = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
        for group in opt.param_groups:
            group["lr"] = cosine_lr(plan.source_lr, step, plan.source_steps, warmup=100)
        loss = F.mse_loss(dit(x, sigma, cap, mask), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == plan.source_steps - 1:
            log(f"source dit step {step}: loss {loss.item():.4f}")
    return dit.eval()


def build_source(repo: Path, plan: Plan, seed: int) -> None:
    """Train the toy VAE and DiT and write the repo root exactly as Z-Image publishes it."""
    tmp = repo.with_name(repo.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = write_tokenizer(tmp / "tokenizer")
    write_text_encoder(tmp / "text_encoder", len(tokenizer), tokenizer.pad_token_id, seed)
    text = model.load_text_encoder(tmp, dtype=torch.float32)
    vae = train_vae(plan, seed)
    normalise_vae(vae, seed)
    write_component(tmp / "vae", vae, {"_class_name": "AutoencoderKL", **asdict(vae.cfg), "use_quant_conv": False,
                                       "use_post_quant_conv": False}, "diffusion_pytorch_model.safetensors")
    dit = train_source_dit(plan, vae, text, seed)
    cfg = TOY_DIT
    write_component(tmp / "transformer", dit, {
        "_class_name": "ZImageTransformer2DModel", "all_patch_size": [cfg.patch_size], "all_f_patch_size": [1],
        "in_channels": cfg.in_channels, "dim": cfg.dim, "n_layers": cfg.n_layers, "n_refiner_layers":
        cfg.n_refiner_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads, "norm_eps": cfg.norm_eps,
        "qk_norm": True, "cap_feat_dim": cfg.cap_feat_dim, "rope_theta": cfg.rope_theta, "t_scale": cfg.t_scale,
        "axes_dims": list(cfg.axes_dims), "axes_lens": [1536, 512, 512]}, "diffusion_pytorch_model.safetensors")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": TOY_SHIFT,
         "use_dynamic_shifting": False}))
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline", "toy": "bench/shapes.py"}))
    tmp.rename(repo)


# ----------------------------------------------------------------------------------------------------------------
# Driving the real scripts
# ----------------------------------------------------------------------------------------------------------------


def script(name: str, *args, log_file: Path | None = None):
    """Run one of the project's scripts as a user would; its output goes to log_file (and the run fails loudly)."""
    cmd = [sys.executable, str(ROOT / name), *map(str, args)]
    with open(log_file or os.devnull, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if result.returncode:
        raise SystemExit(f"{name} failed (exit {result.returncode}); see {log_file}")


def eval_scenes(plan: Plan, seed: int) -> list:
    """Distinct prompts, eval_prompts / 6 per task in task-cycled order (single_object has only 3 captions and
    two_object 6). Repeating a prompt would only repeat its images: seeds, not prompts, give the spread."""
    rng = np.random.default_rng(seed + 1000)
    share = plan.eval_prompts // len(shapeworld.TASKS)
    by_task = {}
    for task in shapeworld.TASKS:
        found = {}
        for _ in range(100 * share):  # enough draws to exhaust a task's captions when it has fewer than `share`
            scene = shapeworld.make_scene(rng, task)
            found.setdefault(scene.caption, scene)
            if len(found) == share:
                break
        by_task[task] = list(found.values())
    return [scenes[j] for j in range(share) for scenes in by_task.values() if j < len(scenes)]


def sample_with_script(folder: Path, prompts_file: Path, plan: Plan, log_file: Path, *, ckpt=None, latent=None,
                       text_encoder=None):
    """sample.py on the evaluation prompts, seeds 0 .. eval_seeds - 1 each: <folder>/<prompt index>_s<seed>.png
    (_latent.png for the source)."""
    shutil.rmtree(folder, ignore_errors=True)
    flags = ["--prompts", prompts_file, "--res", SIZE, "--out", folder, "--device", "cpu", "--dtype", "fp32",
             "--batch-size", 32, "--seed", 0, "--num-images", plan.eval_seeds]
    if ckpt is not None:
        flags += ["--ckpt", ckpt, "--text-encoder", text_encoder, "--steps", plan.sample_steps, "--cfg", plan.pixel_cfg]
    else:
        flags += ["--latent", latent, "--latent-steps", plan.sample_steps, "--latent-cfg", plan.source_cfg_w]
    script("sample.py", *flags, log_file=log_file)


def random_pixel_init(path: Path, seed: int):
    """The scratch baseline's start: the same pixel architecture, every weight freshly initialised."""
    torch.manual_seed(seed)
    net = model.ZImageDiT(model.l2p_config(TOY_DIT, 16, HEAD_WIDTH))
    model.write_safetensors(path, {k: v.detach().contiguous() for k, v in net.state_dict().items()},
                            {"format": "l2p", "l2p_patch": "16", "source": "random init (scratch baseline)"})


VAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
PROMPT_EFFECT_SIGMA = 0.9  # where the layout is decided: the toy source's own v moves 20-36% with the prompt here


@torch.no_grad()
def validation_metrics(ckpt: Path, images: torch.Tensor, cap: torch.Tensor, cap_mask: torch.Tensor,
                       empty: torch.Tensor) -> tuple[float, float]:
    """(validation loss, prompt effect) on held-out images (the source's samples for the evaluation prompts).

    The loss is the flow-matching loss at fixed sigmas and noise: a continuous measure of convergence that moves
    before ShapeEval, which needs well-formed objects. It can fall while the model ignores the prompt (the noisy
    image alone says much about v), so the prompt effect, |v(prompt) - v(empty prompt)| / |v(prompt)| at
    sigma = PROMPT_EFFECT_SIGMA, shows whether the caption reaches the output at all (0 = deaf)."""
    net = model.load_model(ckpt, dtype=torch.float32).eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    losses = [(net((1 - s) * images + s * noise, torch.full((len(images),), s), cap, cap_mask) - (noise - images))
              .square().mean() for s in VAL_SIGMAS]
    s = torch.full((len(images),), PROMPT_EFFECT_SIGMA)
    x = (1 - PROMPT_EFFECT_SIGMA) * images + PROMPT_EFFECT_SIGMA * noise
    v = net(x, s, cap, cap_mask)
    v_empty = net(x, s, empty.expand(len(images), -1, -1), torch.ones(len(images), empty.shape[1], dtype=torch.bool))
    return float(torch.stack(losses).mean()), float((v - v_empty).norm() / v.norm().clamp_min(1e-12))


def train_with_curve(name: str, init: Path, corpus: Path, run: Path, plan: Plan, train_blocks: int, score_fn,
                     log_file: Path) -> list[dict]:
    """train.py in segments of curve_every steps (a resumed run equals an uninterrupted one), scored after each:
    score_fn(checkpoint, tag) -> (ShapeEval dict, validation loss, prompt effect)."""
    shutil.rmtree(run, ignore_errors=True)
    curve = []
    for step in range(plan.curve_every, plan.pixel_steps + 1, plan.curve_every):
        script("train.py", "--init", init, "--data", corpus, "--out", run, "--max-steps", step,
               "--batch-size", plan.pixel_batch, "--lr", plan.pixel_lr, "--head-lr-fan-in", plan.head_lr_fan_in,
               "--warmup", 20, "--train-blocks", train_blocks,
               "--res", SIZE, "--dtype", "fp32", "--device", "cpu", "--workers", 0, "--no-grad-checkpointing",
               "--save-every", plan.curve_every,
               "--sample-every", plan.pixel_steps, "--sample-steps", plan.sample_steps, "--sample-guidance",
               plan.pixel_cfg, "--log-every", 25, *(["--resume"] if step > plan.curve_every else []),
               log_file=log_file)
        score, val, effect = score_fn(run / "trained.safetensors", f"{name}_step{step}")
        curve.append({"step": step, "overall": score["overall"], "val_loss": val, "prompt_effect": effect,
                      "score": score})
        log(f"{name} step {step}: ShapeEval {score['overall']:.3f}, validation loss {val:.4f}, prompt effect "
            f"{effect:.3f}")
    return curve


# ----------------------------------------------------------------------------------------------------------------
# Pictures and the report
# ----------------------------------------------------------------------------------------------------------------


def plot_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, top: float,
               lines: dict[str, tuple[list[tuple[int, float]], tuple[int, int, int]]],
               references: dict[str, tuple[float, tuple[int, int, int]]]):
    """One line chart in box (x0, y0, x1, y1): y from 0 to top, solid lines of (step, value) and dashed references."""
    x0, y0, x1, y1 = box
    max_step = max(step for points, _ in lines.values() for step, _ in points)
    to_xy = lambda step, value: (x0 + (x1 - x0) * step / max_step, y1 - (y1 - y0) * min(value, top) / top)
    draw.line([to_xy(0, 0), to_xy(max_step, 0)], fill="black")
    draw.line([to_xy(0, 0), to_xy(0, top)], fill="black")
    for tick in np.linspace(0, top, 5)[1:]:
        x, y = to_xy(0, tick)
        draw.text((x - 36, y - 6), f"{tick:.2f}", fill="black")
    draw.text(((x0 + x1) // 2 - 50, y1 + 18), f"train steps (max {max_step})", fill="black")
    draw.text((x0, y0 - 34), title, fill="black")
    for name, (value, colour) in references.items():
        (xa, y), (xb, _) = to_xy(0, value), to_xy(max_step, value)
        for x in range(int(xa), int(xb), 12):
            draw.line([(x, y), (min(x + 6, xb), y)], fill=colour, width=2)
        draw.text((xb - 90, y - 14), name, fill=colour)
    for i, (name, (points, colour)) in enumerate(lines.items()):
        draw.line([to_xy(*p) for p in points], fill=colour, width=3)
        draw.text((x1 - 60, y0 + 14 * i), name, fill=colour)


CURVE_COLOURS = {"l2p": (200, 40, 40), "scratch": (40, 90, 200)}


def plot_curve(curve: list[dict], reference: dict[str, float], path: Path, size=(1100, 420)):
    """Left: ShapeEval against training steps (the source and ground truth dashed); right: the validation loss."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    W, H = size
    plot_panel(draw, (60, 60, W // 2 - 30, H - 50), "ShapeEval overall", 1.0,
               {name: ([(0, 0.0)] + [(p["step"], p[name]) for p in curve], c) for name, c in CURVE_COLOURS.items()},
               {"source": (reference["source"], (120, 120, 120)),
                "ground truth": (reference["ground truth"], (180, 180, 180))})
    top = max(p[f"{name}_val_loss"] for p in curve for name in CURVE_COLOURS) * 1.1
    plot_panel(draw, (W // 2 + 60, 60, W - 30, H - 50), "validation loss (held-out source samples)", top,
               {name: ([(p["step"], p[f"{name}_val_loss"]) for p in curve], c) for name, c in CURVE_COLOURS.items()},
               {})
    img.save(path)


def save_grid(columns: dict[str, np.ndarray], prompts: list[str], path: Path, rows: int = 8):
    """One row per prompt (written at its right), one column per model, headed by its name; same seed in a row."""
    rows = min(rows, *(len(images) for images in columns.values()))
    tiles = model.image_grid([columns[name][i] for i in range(rows) for name in columns], len(columns), gap=2)
    header, margin, tile = 16, 300, SIZE + 2
    img = Image.new("RGB", (tiles.shape[1] + margin, tiles.shape[0] + header), "white")
    img.paste(Image.fromarray(tiles), (0, header))
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(columns):
        draw.text((j * tile + 2, 2), name, fill="black")
    for i in range(rows):
        draw.text((tiles.shape[1] + 8, header + i * tile + SIZE // 2 - 6), prompts[i], fill="black")
    img.save(path)


def write_report(results: dict, out: Path):
    scores = results["scores"]
    names = list(scores)
    lines = [f"# bench/shapes.py ({results['mode']})", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in [*shapeworld.TASKS, "overall"]:
        row = [scores[n]["per_task"][task] if task != "overall" else scores[n]["overall"] for n in names]
        lines.append(f"| {task} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", f"L2P / source: {results['l2p_over_source']:.1%} (the paper's GenEval ratio: 93%)",
              f"trainable fraction: L2P {results['trainable_fraction']['l2p']:.1%}, scratch 100%", "",
              "| step | ShapeEval l2p | ShapeEval scratch | validation loss l2p | validation loss scratch | "
              "prompt effect l2p | prompt effect scratch |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['l2p']:.3f} | {p['scratch']:.3f} | {p['l2p_val_loss']:.4f} | "
              f"{p['scratch_val_loss']:.4f} | {p['l2p_prompt_effect']:.3f} | {p['scratch_prompt_effect']:.3f} |"
              for p in results["curve"]]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in results["seconds"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the sizes that measure the claim (<= 60 min on 2 cores)")
    parser.add_argument("--runs", help="where stages are cached (default bench/runs/shapes-quick or shapes-full)")
    parser.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    parser.add_argument("--seed", type=int, default=0, help="seeds the world, the toy models and the corpus")
    return parser.parse_args(argv)


def write_json(path: Path, value):
    """Atomically: a stage killed mid-write leaves no file that a later run would trust as finished."""
    model.atomic_write(path, json.dumps(value).encode())


def main(argv=None, plan: Plan | None = None):
    args = parse_args(argv)
    mode = "full" if args.full else "quick"
    plan = plan or (FULL if args.full else QUICK)
    out = Path(args.runs or ROOT / "bench" / "runs" / f"shapes-{mode}")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # CPU: subnormal floats are many times slower (a toy training step: 1 s vs 0.2 s)
    plan_file = out / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != asdict(plan):
        raise SystemExit(f"{out} holds stages of another plan ({plan_file}); pass --fresh to redo them, or another "
                         "--runs folder")
    write_json(plan_file, asdict(plan))
    log_file, seconds_file = out / "scripts.log", out / "seconds.json"
    # wall time per stage, kept with the cache: a report built from cached stages still shows what each one cost
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    repo, corpus = out / "toy-z-image", out / "corpus"

    scenes = eval_scenes(plan, args.seed)
    eval_prompts = out / "eval_prompts.txt"
    eval_prompts.write_text("\n".join(s.caption for s in scenes) + "\n")
    corpus_prompts = out / "corpus_prompts.txt"
    corpus_prompts.write_text("\n".join(s.caption for s in shapeworld.make_scenes(plan.corpus_prompts, args.seed + 7))
                              + "\n")

    def stage(name: str, build, done: Path, keep_json: bool = False):
        """Run one stage unless `done` shows it finished; with keep_json, build's dict is kept in `done`."""
        if done.exists():
            return json.loads(done.read_text()) if keep_json else None
        begin = time.time()
        value = build()
        if keep_json:
            write_json(done, value)
        seconds[name] = time.time() - begin
        write_json(seconds_file, seconds)
        return value

    stage("toy source (VAE + DiT training)", lambda: build_source(repo, plan, args.seed), repo)
    truth = np.stack([shapeworld.render(s, SIZE) for s in scenes])

    def vae_score():
        vae = model.load_vae(repo)
        with torch.no_grad():
            recon = model.to_uint8(vae.decode(vae.encode(to_tensor(truth))))
        return shapeworld.score(list(recon), scenes)

    # every sampled image: (prompt index, seed), seed-major so that the first len(scenes) are distinct prompts
    sampled = [(i, k) for k in range(plan.eval_seeds) for i in range(len(scenes))]
    sampled_scenes = [scenes[i] for i, _ in sampled]

    def read_samples(folder: Path, suffix: str = "") -> np.ndarray:
        return np.stack([np.asarray(Image.open(folder / f"{i:03d}_s{k}{suffix}.png").convert("RGB"))
                         for i, k in sampled])

    def source_score():
        sample_with_script(out / "samples_source", eval_prompts, plan, log_file, latent=repo)
        return shapeworld.score(list(read_samples(out / "samples_source", "_latent")), sampled_scenes)

    scores = {"ground truth": shapeworld.score(list(truth), scenes),
              "vae": stage("vae reconstructions", vae_score, out / "score_vae.json", keep_json=True),
              "source": stage("source samples", source_score, out / "score_source.json", keep_json=True)}
    source_images = read_samples(out / "samples_source", "_latent")
    log(f"ShapeEval: ground truth {scores['ground truth']['overall']:.3f}, vae {scores['vae']['overall']:.3f}, "
        f"source {scores['source']['overall']:.3f}")

    stage("synth.py corpus", lambda: script(
        "synth.py", "--src", repo, "--prompts", corpus_prompts, "--out", corpus, "--seeds", plan.corpus_seeds,
        "--res", SIZE, "--steps", plan.sample_steps, "--cfg", plan.source_cfg_w, "--shift", TOY_SHIFT,
        "--batch-size", 64, "--device", "cpu", "--dtype", "fp32", log_file=log_file), corpus / "metadata.jsonl")
    init, scratch_init = out / "l2p-init.safetensors", out / "scratch-init.safetensors"
    stage("convert.py", lambda: script("convert.py", "--src", repo, "--out", init, "--patch", 16, "--head-width",
                                       HEAD_WIDTH, "--seed", args.seed, log_file=log_file), init)
    if not scratch_init.exists():
        random_pixel_init(scratch_init, args.seed)

    text = model.load_text_encoder(repo, dtype=torch.float32)
    val_cap, val_mask = text.encode([s.caption for s in sampled_scenes])
    empty_cap = text.encode([""])[0]
    del text

    def score_pixel(ckpt: Path, tag: str) -> tuple[dict, float, float]:
        sample_with_script(out / f"samples_{tag}", eval_prompts, plan, log_file, ckpt=ckpt, text_encoder=repo)
        score = shapeworld.score(list(read_samples(out / f"samples_{tag}")), sampled_scenes)
        return score, *validation_metrics(ckpt, to_tensor(source_images), val_cap, val_mask, empty_cap)

    curves, pixel_images = {}, {}
    for name, start, blocks in (("l2p", init, plan.train_blocks), ("scratch", scratch_init, TOY_DIT.n_layers // 2)):
        curves[name] = stage(f"train.py + sample.py: {name}", lambda: train_with_curve(
            name, start, corpus, out / f"run_{name}", plan, blocks, score_pixel, log_file), out / f"curve_{name}.json",
            keep_json=True)
        scores[name] = curves[name][-1]["score"]
        pixel_images[name] = read_samples(out / f"samples_{name}_step{curves[name][-1]['step']}")

    with torch.device("meta"):
        toy = model.ZImageDiT(model.l2p_config(TOY_DIT, 16, HEAD_WIDTH))
    trainable, frozen = model.set_trainable(toy, plan.train_blocks)
    curve = [{"step": a["step"], "l2p": a["overall"], "scratch": b["overall"], "l2p_val_loss": a["val_loss"],
              "scratch_val_loss": b["val_loss"], "l2p_prompt_effect": a["prompt_effect"],
              "scratch_prompt_effect": b["prompt_effect"]} for a, b in zip(curves["l2p"], curves["scratch"])]
    results = {
        "mode": mode, "plan": asdict(plan),
        "overall": {name: scores[name]["overall"] for name in ("ground truth", "vae", "source", "l2p", "scratch")},
        "scores": scores, "curve": curve,
        "l2p_over_source": scores["l2p"]["overall"] / max(scores["source"]["overall"], 1e-9),
        "trainable_fraction": {"l2p": trainable / (trainable + frozen), "scratch": 1.0},
        "seconds": {**seconds, "total": sum(seconds.values())},
    }
    plot_curve(curve, {"source": scores["source"]["overall"], "ground truth": scores["ground truth"]["overall"]},
               out / "curve.png")
    save_grid({"source": source_images, "l2p": pixel_images["l2p"], "scratch": pixel_images["scratch"]},
              [s.caption for s in sampled_scenes], out / "grid.png")
    write_report(results, out)
    print((out / "results.md").read_text())
    print(out / "results.json")


if __name__ == "__main__":
    main()
