"""
Sample images from an L2P pixel model, from 1K up to native 4K, and optionally from a latent source beside it.

    python sample.py --ckpt l2p-1k.safetensors --text-encoder Z-Image-Turbo/ --prompt "a red fox in fresh snow"
    python sample.py --ckpt l2p-4k.safetensors --text-encoder Z-Image/ --prompts prompts.txt --res 4096
    python sample.py --ckpt l2p-1k.safetensors --latent Z-Image-Turbo/ --prompt "..." --out compare/

Defaults reproduce the released sampler: patch-16 models at 1024^2 with 30 steps and CFG 2.0, patch-64 models at
4096^2 with 50 steps and CFG 4.0; shift 3; empty negative prompt; CFG written v = v_neg + cfg * (v_pos - v_neg).
A pixel FLUX.2 [klein] model samples as klein-base does: 50 steps, CFG 4.0, shift exp(mu) for its token count.
A lifted model (convert.py's default recipe) samples as its source does (its DiT is the source's: Turbo 8 steps, CFG
off; convert.py records the sampler), at 2K / 4K with the shift times patch / 16 (model.pixel_sampler).
The prompts are encoded first and the 4B text encoder freed before the DiT is loaded.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="L2P checkpoint: convert.py / train.py output (init + trained tensors, or "
                                       "merged), or a released L2P 1K / 4K file")
    parser.add_argument("--init", help="for a train.py checkpoint whose init is no longer where the run recorded it "
                                       "(a run folder moved alone): the convert.py output the run started from")
    parser.add_argument("--text-encoder", help="the source repo root or its text_encoder/ folder (the Qwen3 prompt "
                                               "encoder); defaults to the --latent repo when that is given")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    parser.add_argument("--prompts", help="a text file with one prompt per line, or a .jsonl / .csv file with a "
                                          "prompt, text or caption column")
    parser.add_argument("--negative-prompt", default="", help="negative prompt for CFG (the release uses '')")
    parser.add_argument("--res", type=int, help="square size in pixels; default 1024 per 16 pixels of patch "
                                                "(1024 at patch 16, 4096 at patch 64)")
    parser.add_argument("--width", type=int, help="width in pixels (overrides --res)")
    parser.add_argument("--height", type=int, help="height in pixels (overrides --res)")
    parser.add_argument("--steps", type=int, help="Euler steps; default 30 (patch 16) or 50 (patch 64), a lift's "
                                                  "source's")
    parser.add_argument("--cfg", type=float, help="CFG scale c, v = v_neg + c (v_pos - v_neg), 1 = off; default "
                                                  "2.0 (patch 16) or 4.0 (patch 64), a lift's source's")
    parser.add_argument("--shift", type=float, help="static shift of the sigma grid (default 3, a lift's source's; "
                                                    "FLUX.2: exp(mu); a lift's times its patch / 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image k of a prompt uses "
                                                            "seed + k, the same for every prompt")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="images denoised together")
    parser.add_argument("--low-memory", action="store_true",
                        help="CFG as two passes instead of one batch of two (less activation memory)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (the first batch pays the compilation, reported "
                             "apart)")
    parser.add_argument("--out", default="samples", help="output folder, or a .png file for a single image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="DiT precision; default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--latent", help="a source repo (Z-Image, or FLUX.2 [klein]): also sample the same prompts and "
                                         "seeds with the latent source (its own sampler + VAE decode) at the same "
                                         "size, and write side-by-sides")
    parser.add_argument("--latent-steps", type=int, help="source sampler steps (default: Z-Image-Turbo 8, base 50; "
                                                         "klein 4, klein-base 50)")
    parser.add_argument("--latent-cfg", type=float,
                        help="source CFG scale c, as --cfg (default: Z-Image-Turbo 1, Z-Image base 5, i.e. its own "
                             "w = 4 with c = 1 + w; klein 1, klein-base 4)")
    args = parser.parse_args(argv)
    model.check_finite(parser, args)
    if not 0 <= args.seed < 2 ** 62:  # image k uses seed + k; torch's generator takes a signed 64-bit seed
        parser.error(f"--seed must be at least 0 and below 2^62, got {args.seed}")
    for name in ("res", "width", "height", "steps", "num_images", "batch_size", "latent_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.shift is not None and args.shift <= 0:
        parser.error(f"--shift must be positive, got {args.shift}")
    return args


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt) + (model.read_prompt_file(args.prompts) if args.prompts else [])
    if not prompts:
        raise SystemExit("no prompt: pass --prompt '...' or --prompts <file>")
    return prompts


def encode(text_encoder_path: str, prompts: list[str], device: str, dtype: torch.dtype, family: str | None):
    """All prompts and the negative prompt at once, then the encoder is freed: the DiT needs the memory next."""
    encoder = model.load_text_encoder(text_encoder_path, device=device, dtype=dtype, family=family)
    features = [encoder.encode([p]) for p in prompts]
    encoder.release()
    return features


def run(dit, features, negative, jobs, size, steps, cfg, shift, args, vae=None, name="l2p"):
    """Denoise jobs [(prompt index, seed)] in batches; returns {job: uint8 image} and seconds per step."""
    height, width = size
    images, seconds = {}, []
    if args.compile:
        model.compile_blocks(dit)
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        cap, mask = model.cat_captions([features[i][0] for i, _ in batch], [features[i][1] for i, _ in batch])
        neg_cap, neg_mask = model.cat_captions([negative[0]] * len(batch), [negative[1]] * len(batch))
        begin = time.perf_counter()
        out = model.generate(dit, cap, mask, [s for _, s in batch], height, width, steps, shift, cfg, neg_cap,
                             neg_mask, vae=vae, cfg_batch=not args.low_memory, progress=True)
        model.check_finite_images(out, f"{name}, {steps} steps, CFG {cfg}, shift {shift:.3g}")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - begin)
        images.update(zip(batch, model.to_uint8(out)))
    if args.compile:  # the first batch compiled the blocks
        print(f"{name}: first batch {seconds[0]:.1f} s with compilation")
        seconds = seconds[1:] or seconds
    print(f"{name}: {sum(seconds) / (steps * len(seconds)):.3f} s/step at {width}x{height}, batch {args.batch_size}"
          f"{' (incl. VAE decode)' if vae is not None else ''}")
    return images


def resolve_settings(args, dit_cfg) -> tuple[int, int, int, float, float]:
    """width, height, steps, cfg, shift: the model's default sampler (model.pixel_sampler) unless the flags say
    otherwise. dit_cfg None: --latent alone."""
    patch = dit_cfg.patch_size if dit_cfg else 16
    res = args.res or 1024 * patch // 16
    width, height = args.width or res, args.height or res
    steps, cfg, shift = model.pixel_sampler(dit_cfg, (width // patch) * (height // patch), args.steps) if dit_cfg \
        else (args.steps or 30, 2.0, 3.0)
    cfg, shift = args.cfg if args.cfg is not None else cfg, args.shift or shift
    if width % patch or height % patch:
        raise SystemExit(f"{width}x{height} is not a multiple of the model's {patch}-pixel patch: pick a size "
                         f"divisible by {patch} (e.g. {max(patch, width // patch * patch)}x"
                         f"{max(patch, height // patch * patch)})")
    if (width // patch) * (height // patch) > 4096:
        print(f"warning: {width}x{height} at patch {patch} is {(width // patch) * (height // patch):,d} tokens, more "
              "than the 4,096 the model was trained on (a patch-64 model keeps 4K at 64x64 tokens)")
    return width, height, steps, cfg, shift


def output_path(out: Path, prompt_index: int, seed: int, single: bool, suffix: str = "") -> Path:
    if single and out.suffix == ".png":
        return out.with_name(out.stem + suffix + ".png")
    return out / f"{prompt_index:03d}_s{seed}{suffix}.png"


def main(argv=None):
    # Fewer, growable CUDA segments: at 4K the head's big activations otherwise fragment memory (set before CUDA init).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = parse_args(argv)
    prompts = read_prompts(args)
    torch.set_flush_denormal(True)  # CPU: arithmetic on subnormal floats is many times slower
    if args.ckpt is None and args.latent is None:
        raise SystemExit("nothing to sample: pass --ckpt <L2P checkpoint> (and/or --latent <source repo>)")
    text_encoder = args.text_encoder or args.latent
    if text_encoder is None:
        raise SystemExit("sample.py needs the Qwen3 text encoder: pass --text-encoder <the source repo or its "
                         "text_encoder/ folder>")
    args.device = str(model.parse_device(args.device))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if "cuda" in args.device else "fp32")]

    dit_cfg, family = None, None  # without --ckpt the text recipe is the --latent repo's
    if args.ckpt:
        checkpoint = model.open_checkpoint(args.ckpt, args.init)
        if not checkpoint.cfg.pixel_head:
            raise SystemExit(f"--ckpt {args.ckpt} is a latent transformer ({checkpoint.layout}), not an L2P pixel "
                             "model: make one with convert.py, or sample the source with --latent <repo>")
        if args.init and checkpoint.trained is None:
            raise SystemExit(f"--init completes a train.py checkpoint, but --ckpt {args.ckpt} is whole "
                             f"({checkpoint.layout}): drop --init")
        dit_cfg, family = checkpoint.cfg, checkpoint.cfg.family
    if family and args.latent and model.pipeline_family(args.latent) != family:
        raise SystemExit(f"--ckpt is an L2P model of {family}, --latent a {model.pipeline_family(args.latent)} repo: "
                         "their prompts are encoded differently; sample them one at a time")
    model.check_text_encoder(text_encoder, checkpoint.cfg if args.ckpt else model.open_checkpoint(args.latent).cfg)
    width, height, steps, cfg, shift = resolve_settings(args, dit_cfg)
    jobs = [(i, args.seed + k) for i in range(len(prompts)) for k in range(args.num_images)]
    out = Path(args.out)
    single = len(jobs) == 1
    if out.suffix == ".png" and not single:
        raise SystemExit(f"--out {out} is one file but {len(jobs)} images are asked for: pass a folder")
    if out.suffix.lower() in (".jpg", ".jpeg", ".webp") or out.suffix != ".png" and out.is_file():
        raise SystemExit(f"--out {out}: sample.py writes PNG files into a folder, or one .png file; pass one of those")

    features = encode(text_encoder, prompts + [args.negative_prompt], args.device, dtype, family)
    features, negative = features[:-1], features[-1]
    results = {}
    if args.ckpt:
        dit = model.load_model(args.ckpt, device=args.device, dtype=dtype, init=args.init)
        results["l2p"] = run(dit, features, negative, jobs, (height, width), steps, cfg, shift, args)
        del dit
        for (i, seed), pixels in results["l2p"].items():
            model.save_png(output_path(out, i, seed, single), pixels,
                           {"prompt": prompts[i], "negative_prompt": args.negative_prompt, "seed": seed, "steps": steps,
                      "cfg": cfg, "shift": shift, "checkpoint": Path(args.ckpt).name, "model": "l2p"})
    if args.latent:
        if width % 16 or height % 16:
            raise SystemExit(f"{width}x{height}: the latent source needs multiples of 16 (VAE x8, latent patch 2)")
        source = model.source_sampler_settings(args.latent, height, width, args.latent_steps)
        latent_steps = source["steps"]
        latent_guidance = args.latent_cfg if args.latent_cfg is not None else source["guidance"]
        dit = model.load_model(args.latent, device=args.device, dtype=dtype)
        vae = model.load_vae(args.latent, device=args.device)
        model.check_vae_fits(vae, dit.cfg.in_channels * dit.cfg.patch_size ** 2, f"--latent {args.latent}: its vae/")
        results["latent"] = run(dit, features, negative, jobs, (height, width), latent_steps, latent_guidance,
                                source["shift"], args, vae=vae, name="latent source")
        del dit, vae
        for (i, seed), pixels in results["latent"].items():
            model.save_png(output_path(out, i, seed, single, "_latent"), pixels,
                     {"prompt": prompts[i], "seed": seed, "steps": latent_steps, "cfg": latent_guidance,
                      "shift": source["shift"], "checkpoint": Path(args.latent).name, "model": "latent source"})
    if len(results) == 2:
        for job in jobs:  # side by side: L2P | latent source
            model.save_png(output_path(out, *job, single, "_compare"),
                     np.concatenate([results["l2p"][job], results["latent"][job]], axis=1))
    print(f"wrote {len(jobs) * len(results)} images to {out}; peak memory {model.peak_memory_gib(args.device):.2f} "
          f"GiB ({'GPU allocated' if args.device.startswith('cuda') else 'process RSS'})")


if __name__ == "__main__":
    model.run_script(main)
