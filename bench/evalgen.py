"""
What bench/geneval.py and bench/dpg.py share: the generator flags, making images through model.py (an L2P pixel
checkpoint, or with --latent the Z-Image source LDM and its VAE), atomic writes, and the checks that make a run
resumable (which images are already on disk and valid, and that they were made with the same settings).
"""

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import model

# The released L2P sampler (1K): 30 Euler steps, CFG c = 2.0 against the empty prompt, shift 3. The source LDM's
# defaults are its repo's own (model.source_sampler_settings).
L2P_DEFAULTS = dict(steps=30, guidance=2.0, shift=3.0)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Settings that change the pixels: a run may only add images to a folder whose images were made with the same ones.
SETTINGS_THAT_MATTER = ("model", "checkpoint", "text_encoder", "steps", "guidance", "shift", "height", "width",
                        "seed", "images_per_prompt", "negative_prompt", "dtype")


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------

def add_generation_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("generation (used by --stage generate and all)")
    g.add_argument("--ckpt", help="the L2P pixel checkpoint to evaluate: any file load_model reads (convert.py output, "
                                  "a train.py checkpoint next to its init, the released merged file)")
    g.add_argument("--latent", metavar="ZIMAGE_REPO",
                   help="evaluate the source LDM instead: a Z-Image repo root (transformer/, vae/, text_encoder/, "
                        "tokenizer/, scheduler/); its defaults are the repo's own sampler (Turbo: 8 steps, CFG "
                        "off, shift 3; base: 50 steps, CFG 5.0, shift 6)")
    g.add_argument("--text-encoder",
                   help="Qwen3 text encoder: a Z-Image repo root, its text_encoder/ folder or qwen_3_4b.safetensors "
                        "(required with --ckpt; defaults to the --latent repo)")
    g.add_argument("--steps", type=int, help="Euler steps (default: 30 for L2P, the repo's with --latent)")
    g.add_argument("--guidance", type=float,
                   help="CFG scale c in v = v_neg + c (v_pos - v_neg) against the empty prompt; 1 = off "
                        "(default: 2.0 for L2P, the repo's with --latent)")
    g.add_argument("--shift", type=float,
                   help="static sigma shift (default: 3 for L2P; with --latent the repo's scheduler_config.json)")
    g.add_argument("--resolution", type=int, default=1024, help="square image side in pixels (default 1024)")
    g.add_argument("--seed", type=int, default=0,
                   help="image k of prompt i uses seed + i * images_per_prompt + k (default 0)")
    g.add_argument("--batch-size", type=int, default=4, help="images per DiT forward pass (default 4; CFG doubles it)")
    g.add_argument("--dtype", choices=DTYPES, default="bf16", help="DiT and text encoder dtype (default bf16)")


def add_common_args(parser: argparse.ArgumentParser):
    parser.add_argument("--out", required=True, help="output folder: images, per-prompt scores, results.json/.md")
    parser.add_argument("--stage", choices=["generate", "score", "all"], default="all",
                        help="generate: make the missing images; score: judge the images on disk; all: both")
    parser.add_argument("--limit", type=int, help="only the first N prompts (a quick partial run; results say so)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for the generator and the judges (default: cuda if available)")
    parser.add_argument("--judge-dtype", choices=DTYPES, default="fp32",
                        help="dtype of the judge models (default fp32, as the reference harnesses run them)")


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------

def write_json(path: Path, obj):
    model.atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_text(path: Path, text: str):
    model.atomic_write(path, text.encode())


def save_png(path: Path, image: Image.Image):
    model.save_png(path, np.asarray(image.convert("RGB")))


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable (a resumed run then redoes that piece)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def valid_image(path: Path, size: tuple[int, int] | None = None) -> bool:
    """True when `path` is a complete, readable image (of `size` (width, height) if given)."""
    try:
        with Image.open(path) as image:
            if size is not None and image.size != tuple(size):
                return False
            image.verify()  # reads to the end: catches truncated files
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(p) for p in model.to_uint8(images)]


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------

def sampler_settings(args, images_per_prompt: int) -> dict:
    """The generator and sampler a run uses, with the defaults of its kind filled in; checks the flags."""
    if bool(args.ckpt) == bool(args.latent):
        raise SystemExit("pass exactly one of --ckpt (an L2P checkpoint) or --latent (a Z-Image repo, the source LDM)")
    if args.latent:
        repo = Path(args.latent)
        if not (repo / "transformer").is_dir() or not (repo / "vae").is_dir():
            raise SystemExit(f"--latent {repo}: expected a Z-Image repo root with transformer/ and vae/ folders")
        try:
            defaults = model.source_sampler_settings(repo, args.resolution, args.resolution, args.steps)
        except model.CheckpointError as e:
            raise SystemExit(f"--latent {repo}: {e}") from None
        kind, checkpoint = "latent", repo
        text_encoder = Path(args.text_encoder) if args.text_encoder else repo
    else:
        if not args.text_encoder:
            raise SystemExit("an L2P checkpoint carries no text encoder: pass --text-encoder <Z-Image repo root, its "
                             "text_encoder/ folder or qwen_3_4b.safetensors>")
        kind, checkpoint, defaults = "l2p", Path(args.ckpt), L2P_DEFAULTS
        text_encoder = Path(args.text_encoder)
    for path, flag in ((checkpoint, "--ckpt/--latent"), (text_encoder, "--text-encoder")):
        if not path.exists():
            raise SystemExit(f"{flag} {path} does not exist")
    try:  # a wrong file fails now, not after the text encoder has run
        cfg = model.open_checkpoint(checkpoint).cfg  # headers only
        if cfg.pixel_head != (kind == "l2p"):
            raise SystemExit(f"{checkpoint} is a latent Z-Image transformer: evaluate the source with --latent <its "
                             "repo root>" if kind == "l2p" else f"{checkpoint} holds an L2P pixel model: pass it with "
                             "--ckpt")
        # pixels per token side, as model.generate checks them; a latent model's VAE is built on the meta device
        multiple = cfg.patch_size * (1 if cfg.pixel_head else model.load_vae(checkpoint, device="meta").downscale)
    except model.CheckpointError as e:
        raise SystemExit(f"--ckpt/--latent {checkpoint}: {e}") from None
    if args.resolution % multiple:
        raise SystemExit(f"--resolution {args.resolution} must be a multiple of {multiple} for this model")
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)
    settings = dict(model=kind, checkpoint=str(checkpoint.resolve()), text_encoder=str(text_encoder.resolve()),
                    steps=pick("steps"), guidance=pick("guidance"), shift=pick("shift"), height=args.resolution,
                    width=args.resolution, seed=args.seed, images_per_prompt=images_per_prompt,
                    negative_prompt="", dtype=args.dtype)
    if settings["steps"] < 1 or args.resolution < 1 or args.batch_size < 1 or images_per_prompt < 1:
        raise SystemExit("--steps, --resolution, --batch-size and --images-per-prompt must be positive")
    return settings


def check_settings(out: Path, settings: dict):
    """Record the settings in <out>/generation.json, or refuse to add images made differently to an existing run."""
    path = out / "generation.json"
    previous = read_json(path)
    if previous is not None:
        changed = [k for k in SETTINGS_THAT_MATTER if previous.get(k) != settings.get(k)]
        if changed:
            diff = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise SystemExit(f"{out} holds images made with other settings ({diff}); use another --out, or delete "
                             f"{path} and the images to start over")
    write_json(path, settings)


@dataclass
class Job:
    """One image to make: its prompt, its seed, and where the caller wants it (`key`, opaque here)."""
    key: object
    prompt: str
    seed: int


@torch.no_grad()
def encode_prompts(settings: dict, prompts: list[str], device, chunk: int = 8) -> dict[str, tuple]:
    """prompt -> (cap [1, L, D], mask [1, L]) on the CPU; the text encoder is freed afterwards so that the DiT has
    the memory."""
    encoder = model.load_text_encoder(settings["text_encoder"], device=device, dtype=DTYPES[settings["dtype"]])
    unique = list(dict.fromkeys(prompts))
    features = {}
    for start in tqdm(range(0, len(unique), chunk), desc="encoding prompts", unit="batch", leave=False):
        batch = unique[start:start + chunk]
        cap, mask = encoder.encode(batch)
        for i, prompt in enumerate(batch):
            n = int(mask[i].sum())  # right-padded: the first n rows are the prompt's own
            features[prompt] = (cap[i:i + 1, :n].cpu(), mask[i:i + 1, :n].cpu())
    encoder.release()
    return features


def generate_images(settings: dict, jobs: list[Job], on_image, batch_size: int, device):
    """Make every job's image and hand it to on_image(job, PIL image) as soon as its batch is done.

    Each image's noise depends on its seed alone (model.noise_for_seeds) and captions are masked per sample, so an
    image does not depend on which other images share its batch: a resumed run remakes a lost image as it was.
    """
    if not jobs:
        return
    guided = settings["guidance"] != 1.0
    features = encode_prompts(settings, [job.prompt for job in jobs] + [settings["negative_prompt"]] * guided, device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    dit = model.load_model(settings["checkpoint"], device=device, dtype=DTYPES[settings["dtype"]])
    vae = model.load_vae(settings["checkpoint"], device=device) if settings["model"] == "latent" else None
    negative = features[settings["negative_prompt"]] if guided else None
    with tqdm(total=len(jobs), desc="generating", unit="image") as progress:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            cap, mask = model.cat_captions(*zip(*(features[job.prompt] for job in batch)))
            neg_cap, neg_mask = (None, None) if negative is None else (
                negative[0].expand(len(batch), -1, -1), negative[1].expand(len(batch), -1))
            images = model.generate(dit, cap, mask, [job.seed for job in batch], settings["height"], settings["width"],
                                    settings["steps"], settings["shift"], settings["guidance"], neg_cap, neg_mask,
                                    vae=vae)
            for job, image in zip(batch, to_pil(images)):
                on_image(job, image)
            progress.update(len(batch))
    del dit, vae
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------

def describe_generation(out: Path) -> dict:
    """The settings the images in `out` were made with (generation.json), or a note when they came from elsewhere."""
    return read_json(out / "generation.json") or {"note": f"no generation.json in {out}: images made elsewhere"}


def generation_lines(generation: dict) -> list[str]:
    """Markdown bullet lines naming the checkpoint and the sampler settings."""
    if "note" in generation:
        return [f"- generator: {generation['note']}"]
    kind = "L2P pixel model" if generation["model"] == "l2p" else "source LDM (latent, with its VAE)"
    cfg = "off" if generation["guidance"] == 1.0 else f"c = {generation['guidance']} against the empty prompt"
    return [f"- generator: {kind} `{generation['checkpoint']}`",
            f"- text encoder: `{generation['text_encoder']}`",
            f"- sampler: {generation['steps']} Euler steps, CFG {cfg}, shift {generation['shift']}, "
            f"{generation['width']}x{generation['height']}, {generation['dtype']}",
            f"- seeds: image k of prompt i uses {generation['seed']} + i * {generation['images_per_prompt']} + k"]
