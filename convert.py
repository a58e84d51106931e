"""
Turn a latent source (Z-Image, or FLUX.2 [klein]) into the L2P pixel model's initial checkpoint.

    python convert.py --src Z-Image-Turbo/ --out l2p-init-1k.safetensors --align-data data/zt   # 1K, the lift
    python convert.py --src Z-Image/ --out l2p-init-4k.safetensors --patch 64 --align-data data/z  # native 4K
    python convert.py --src FLUX.2-klein-base-4B/ --out l2p-klein-init-1k.safetensors --align-data data/k
    python convert.py --src Z-Image-Turbo/ --out l2p-paper-1k.safetensors --recipe paper         # the paper's init
    python convert.py --src runs/l2p/trained.safetensors --out l2p-1k.safetensors                # merge init + trained

Every source tensor whose name and shape fit the pixel model is copied bit for bit (blocks, refiners, timestep and
caption embedders, modulations, pad tokens); the latent patch embedder is dropped; the new RGB patch embedder
(Z-Image: all_x_embedder.{p}-1, as the released L2P files; FLUX.2: pixel_embedder, without bias like every FLUX.2
layer) and the Detailer Head local_decoder are created. --recipe paper initialises them from --seed and drops the
output layer too; the default --recipe lift fits the embedder to the source through its VAE on --align-data (a
synth.py output), keeps the output layer and the fit, and teaches the head to decode (--head-steps). Tensors stream
from the source to the output one at a time, so a 24 GB checkpoint converts on a machine with less memory than that.

Given a train.py checkpoint (only the trained tensors + the path of their init), it writes instead the merged full
checkpoint (for Z-Image in the released L2P layout, which other L2P code can load).
"""

import argparse
import json
import os
import time
from itertools import chain
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True,
                        help="the latent source (Z-Image or FLUX.2 [klein]): a repo root, its transformer/ folder, or "
                             "a single .safetensors file; or a train.py checkpoint to merge with its init")
    parser.add_argument("--out", required=True, help="the L2P checkpoint to write (.safetensors, one file)")
    parser.add_argument("--init", help="merging a train.py checkpoint whose init is no longer where the run recorded "
                                       "it: the convert.py output the run started from")
    parser.add_argument("--patch", type=int, default=16,
                        help="pixel patch: 16 keeps the source's token grid at 1024^2 (8x VAE x 2x2 latent patch); "
                             "64 keeps it at 4096^2; 32 and 128 follow the same rule")
    parser.add_argument("--head-width", type=int, default=64,
                        help="Detailer Head channels at half resolution (64 = the released heads; less for toy models)")
    parser.add_argument("--recipe", choices=model.RECIPES, default="lift",
                        help="lift (default): the embedder and the source's own output layer aligned to the source's "
                             "latent tokens, so the converted model samples the source's scenes before training, "
                             "and a Detailer Head that adds x0 detail to them (needs --align-data); paper: a random "
                             "embedder and a head that predicts v (the released L2P files); x0: paper with "
                             "x-prediction; embedder: paper with the aligned embedder")
    parser.add_argument("--align-data", help="images the source made (a synth.py output, or a folder of images): "
                                             "the lift is fitted to their latent tokens through the source's VAE; "
                                             "at --patch 32 / 64, images of that size (2K / 4K), which the fit "
                                             "area-downsamples to the 1K token grid")
    parser.add_argument("--align-images", type=int, default=1000, help="how many of them the fit reads")
    parser.add_argument("--vae", help="the source's VAE (default: the vae/ of --src's repo); any layout load_vae reads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the fit runs the VAE encoder (bf16 on CUDA, fp32 on the CPU); the conversion "
                             "itself streams on the CPU")
    parser.add_argument("--head-sigma", action=argparse.BooleanOptionalAction,
                        help="the Detailer Head reads sigma as an input channel (default: with --recipe lift)")
    parser.add_argument("--head-lift", action=argparse.BooleanOptionalAction,
                        help="the Detailer Head reads the lifted prediction as 3 more input channels (default: with "
                             "--recipe lift)")
    parser.add_argument("--head-tokens", choices=["raw", "norm"], default="raw",
                        help="what the Detailer Head reads of the DiT's last layer: its raw image tokens (the released "
                             "heads), or their parameter-free LayerNorm (what FLUX.2's norm_out and Z-Image's final "
                             "layer apply before their modulation)")
    parser.add_argument("--head-steps", type=int,
                        help="--recipe lift: steps that teach the Detailer Head to turn the lifted latent of each "
                             "--align-data image into the image (the VAE decoder's job; no DiT pass) before any "
                             "training (default 2000; 0: the head starts at zero, the converted model is the source)")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="AdamW learning rate of those steps")
    parser.add_argument("--head-batch", type=int, default=16, help="crops per step of those steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new patch embedder and head")
    parser.add_argument("--tail-modulation", type=int, default=0, metavar="N",
                        help="FLUX.2: give the last N single-stream blocks a private copy of the shared single-stream "
                             "modulation (initialised from it), so that they can train it while the frozen blocks "
                             "keep the source's; N = train.py's --train-blocks (default 0: none)")
    parser.add_argument("--dtype", choices=["keep", "bf16", "fp32"], default="keep",
                        help="keep: copied tensors keep the source dtype (bit-identical), new ones are fp32; "
                             "bf16 / fp32: cast everything (bf16 halves the file)")
    args = parser.parse_args(argv)
    model.check_finite(parser, args)
    if args.patch not in (16, 32, 64, 128):
        parser.error(f"--patch {args.patch}: the Detailer Head needs 16, 32, 64 or 128 (one pooling level per "
                     "factor 2 down to the token grid)")
    if args.head_width < 8 or args.head_width % 8:
        parser.error(f"--head-width {args.head_width}: use a positive multiple of 8")
    if args.align_images < 1:
        parser.error(f"--align-images must be at least 1, got {args.align_images}")
    lift = args.recipe == "lift"
    args.head_sigma = lift if args.head_sigma is None else args.head_sigma
    args.head_lift = lift if args.head_lift is None else args.head_lift
    args.head_steps = (2000 if lift else 0) if args.head_steps is None else args.head_steps
    if args.head_steps < 0 or args.head_batch < 1 or not args.head_lr > 0:
        parser.error("--head-steps must be at least 0, --head-batch at least 1 and --head-lr positive")
    if not lift and (args.head_lift or args.head_steps):
        parser.error(f"--head-lift and --head-steps need --recipe lift, not {args.recipe}")
    return args


ALIGN_BATCH = 8  # images of one size encoded together by the VAE
HEAD_CROP_TOKENS = 16  # the head's steps read crops of up to 16 x 16 tokens (256 pixels at patch 16)
HEAD_WINDOW_PIXELS = 1024  # of each align image they keep a window this wide: 1,000 images at 4K would be 50 GB


def read_align_images(folder: Path, count: int, patch: int):
    """The first `count` images of a synth.py output or a train.py data folder (metadata order), else of a folder of
    images (sorted), each as [1, 3, H, W] in [-1, 1], centre-cropped to a multiple of the patch (the fit reads whole
    patches only)."""
    if (folder / "metadata.jsonl").exists() or (folder / "metadata.csv").exists():
        names = [record.image for record in model.find_records(folder)]
    else:
        names = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not names:
        raise SystemExit(f"--align-data {folder}: no images (a synth.py output, or a folder of .png / .jpg files)")
    for name in names[:count]:
        try:
            with Image.open(name) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise SystemExit(f"--align-data: cannot read {name} ({e}); remove it or fix it") from None
        h, w = pixels.shape[0] // patch * patch, pixels.shape[1] // patch * patch
        if not h or not w:
            raise SystemExit(f"--align-data: {name} is smaller than one {patch} x {patch} patch")
        top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
        crop = np.array(pixels[top:top + h, left:left + w])
        yield torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1


def fit_to_source(args, vae_path, family: str, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor, dict, list]:
    """The lift of --patch pixels onto the source's latent tokens, fitted on the --align-data images area-downsampled
    to the source's 1K token grid (model.fit_lift at the source's token size t, then model.extend_lift by p / t),
    how well it fits, and (with --head-steps) each image with its latent tokens on the p-patch grid (a random
    window of HEAD_WINDOW_PIXELS at 2K / 4K)."""
    device = model.parse_device(args.device)
    vae = model.load_vae(vae_path, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                         family=family)
    model.check_vae_fits(vae, latent_dim, f"--vae {vae_path}")
    token = model.latent_token_pixels(vae)
    if args.patch % token:
        raise SystemExit(f"--patch {args.patch}: the lift needs a multiple of the source's latent token, {token} x "
                         f"{token} pixels")
    factor, count = args.patch // token, [0]
    window, g = max(HEAD_CROP_TOKENS, HEAD_WINDOW_PIXELS // args.patch), torch.Generator().manual_seed(args.seed)

    def pairs():
        batch = []
        for image in tqdm(chain(read_align_images(Path(args.align_data), args.align_images, args.patch), [None]),
                          total=args.align_images + 1, desc="fitting the lift", unit="image"):
            if batch and (image is None or image.shape != batch[0].shape or len(batch) == ALIGN_BATCH):
                full = torch.cat(batch)
                small = torch.nn.functional.avg_pool2d(full, factor) if factor > 1 else full
                with torch.no_grad():
                    z = model.latent_tokens(vae, small.to(device)).cpu()
                if args.head_steps:  # kept for the head's steps: a window of the image as uint8, its tokens on the grid
                    h, w, p = full.shape[-2] // args.patch, full.shape[-1] // args.patch, args.patch
                    for pixels, tokens in zip(((full + 1) * 127.5).round().to(torch.uint8), z.unflatten(1, (h, w))):
                        r, c = (int(torch.randint(max(n - window, 0) + 1, (), generator=g)) for n in (h, w))
                        kept.append((pixels[:, r * p:(r + window) * p, c * p:(c + window) * p].clone(),
                                     tokens[r:r + window, c:c + window].clone()))
                yield model.patchify(small, token), z
                count[0], batch = count[0] + len(batch), []
            batch += [image] if image is not None else []

    kept = []
    basis, scale, fit = model.fit_lift(pairs())
    stats = {"align_images": str(count[0]), "align_scale_1k": f"{scale.item():.6g}",
             **{f"align_{k}": f"{v:.4f}" for k, v in fit.items()}}
    basis, scale = model.extend_lift(basis, scale, factor)
    return basis, scale, stats, kept


HEAD_SHIFT = 3.0  # sigma shift of the head's steps, Z-Image's training shift


def teach_head_to_decode(created: dict[str, torch.Tensor], cfg, kept: list, args) -> tuple[dict, float]:
    """--head-steps: the head learns the way back from the lifted latent L = s basis^T z of an image to the image
    (what the source's VAE decoder does, and what a linear lift cannot), on patch-aligned crops of the align images:
    it reads the noisy state (1 - sigma) L + sigma eps that the sampler holds, L and sigma, with the DiT's token map
    zero (its input path to the bottleneck starts at zero, so the DiT's tokens join through training); loss
    ||L + head - x0||^2, sigma shifted by HEAD_SHIFT. Starts from and returns the head's tensors in `created` (the
    lift's too), with the last 100 steps' mean loss."""
    device, p = model.parse_device(args.device), args.patch
    head = model.DetailerHead(model.head_channels(cfg), cfg.dim, p, cfg.head_width, cfg.in_channels)
    head.load_state_dict({k.removeprefix("local_decoder."): v for k, v in created.items()
                          if k.startswith("local_decoder.")})
    head.to(device).train()
    with torch.no_grad():
        head.bottleneck[0].weight[:, -cfg.dim:] = 0
    lift = model.PixelLift(*created["lift.basis"].shape).to(device)
    lift.load_state_dict({k.removeprefix("lift."): v for k, v in created.items() if k.startswith("lift.")})
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.head_lr, weight_decay=0.01)
    g, losses = torch.Generator().manual_seed(args.seed), []
    crop = min(HEAD_CROP_TOKENS, *(min(z.shape[:2]) for _, z in kept))
    for step in tqdm(range(args.head_steps), desc="teaching the head to decode", unit="step"):
        x0, z = [], []
        for i in torch.randint(len(kept), (args.head_batch,), generator=g).tolist():
            image, tokens = kept[i]
            r, c = (int(torch.randint(n - crop + 1, (), generator=g)) for n in tokens.shape[:2])
            x0.append(image[:, r * p:(r + crop) * p, c * p:(c + crop) * p])
            z.append(tokens[r:r + crop, c:c + crop].flatten(0, 1))
        x0 = torch.stack(x0).to(device).float() / 127.5 - 1
        lifted = model.unpatchify(lift.to_pixels(torch.stack(z).to(device)), p, crop * p, crop * p)
        sigma = model.shift_sigma(torch.rand(args.head_batch, generator=g), HEAD_SHIFT).to(device)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * lifted + sigma.view(-1, 1, 1, 1) * torch.randn(
            lifted.shape, generator=g).to(device)
        head_in = model.head_input(noisy, lifted if cfg.head_lift else None, sigma if cfg.head_sigma else None)
        out = head(head_in, torch.zeros(args.head_batch, cfg.dim, crop, crop, device=device))
        loss = (lifted + out - x0).square().mean()
        for group in optimizer.param_groups:
            group["lr"] = args.head_lr * min(1.0, (step + 1) / 20)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        losses = (losses + [loss.item()])[-100:]
    return {f"local_decoder.{k}": v.detach().cpu() for k, v in head.state_dict().items()}, sum(losses) / len(losses)


def new_tensors(cfg, seed: int, aligned: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The parts of the pixel model that the latent source does not have, freshly initialised (PyTorch's default
    Linear; the head as DetailerHead.reset_parameters), with the aligned embedder and the lift where given (the
    head's draw is then the same as without them)."""
    torch.manual_seed(seed)
    p, flux2 = cfg.patch_size, cfg.family == "flux2"
    embedder = torch.nn.Linear(p * p * cfg.in_channels, cfg.dim, bias=not flux2)
    head = model.DetailerHead(model.head_channels(cfg), cfg.dim, p, cfg.head_width, cfg.in_channels)
    name = "pixel_embedder" if flux2 else f"all_x_embedder.{p}-1"
    tensors = {f"{name}.{k}": v for k, v in embedder.state_dict().items()}
    tensors.update({f"{name}.{k}": v for k, v in (aligned or {}).items() if k in ("weight", "bias")})
    tensors.update({f"local_decoder.{k}": v for k, v in head.state_dict().items()})
    tensors.update({k: v for k, v in (aligned or {}).items() if k.startswith("lift.")})
    return tensors


def aligned_tensors(args, source: model.DiTCheckpoint, cfg) -> tuple[dict[str, torch.Tensor], dict[str, str], list]:
    """--recipe embedder / lift: the patch embedder that reads the lift's projection as the source's embedder reads a
    latent token (weight E_lat basis, bias E_lat's), and the lift itself; plus the fit's numbers for the metadata."""
    if not args.align_data:
        raise SystemExit(f"--recipe {args.recipe} fits the pixel patches to the source's latent tokens: pass "
                         "--align-data <a synth.py output or a folder of images the source made> (or --recipe paper)")
    vae = args.vae or repo_root(args.src, "vae")
    if vae is None:
        raise SystemExit(f"--src {args.src} has no vae/ folder at or above it: pass the source's VAE with --vae (its "
                         "repo's vae/ or ae.safetensors)")
    latent = "x_embedder." if cfg.family == "flux2" else f"all_x_embedder.{model.ZIMAGE_LATENT_PATCH}-1."
    embedder = {k.removeprefix(latent): t.float() for k, t in source.tensors() if k.startswith(latent)}
    basis, scale, stats, kept = fit_to_source(args, vae, cfg.family, embedder["weight"].shape[1])
    aligned = {"weight": embedder["weight"] @ basis, **({"bias": embedder["bias"]} if "bias" in embedder else {})}
    if cfg.lift_dim:
        aligned.update({"lift.basis": basis, "lift.scale": scale})
    return aligned, stats, kept


def repo_root(src, marker: str) -> Path | None:
    """The repo root holding `marker` (a file or folder) at --src: a repo root or a file in it, or above a
    transformer/ folder or a file in that folder (not above other folders: a ComfyUI models/ tree is no repo)."""
    path = Path(os.path.abspath(src))  # not resolve(): a Hugging Face cache links each file into blobs/
    folder = path if path.is_dir() else path.parent
    roots = [folder, folder.parent] if folder.name == "transformer" else [folder]
    return next((root for root in roots if (root / marker).exists()), None)


def source_sampler(src, family: str) -> list | None:
    """[steps, guidance, static shift (0: FLUX.2's exp(mu))] of the source's own sampler, from the repo root at or
    above --src (Z-Image: scheduler/, FLUX.2: model_index.json): a lift samples with the source's DiT, so this is
    what sample.py defaults to for it. None, said in a line, where no repo root is found."""
    root = repo_root(src, "model_index.json" if family == "flux2" else "scheduler/scheduler_config.json")
    if root is not None:
        settings = (model.flux2_sampler_settings(root, 1024, 1024) if family == "flux2" else
                    model.source_sampler_settings(root))
        return [settings["steps"], settings["guidance"], settings["shift"] if family == "zimage" else 0]
    print(f"sampler --src {src} has no repo root around it: sample.py will use the released defaults for this lift "
          "(pass the source's --steps / --cfg, e.g. Turbo's 8 and 1)")
    return None


def count(specs) -> int:
    return sum(t.numel() for t in specs.values())


def merge(source: model.DiTCheckpoint, out: Path, cast: torch.dtype | None, args):
    """init + trained tensors -> one full checkpoint in the released layout, with the init's recipe (the lift stays
    in fp32)."""
    convert = lambda k, t: t.to(cast) if cast is not None and t.is_floating_point() and k[:5] != "lift." else t
    specs = {k: convert(k, t) for k, t in source.tensors(meta=True)}
    metadata = {**model.safetensors_metadata(source.files[0]), "format": "l2p",  # the init's recipe, source, fit
                "l2p_patch": str(source.cfg.patch_size), "merged_from": str(args.src), "dtype": args.dtype,
                "written_by": "convert.py"}
    model.write_safetensors(out, ((k, convert(k, t)) for k, t in source.tensors()), metadata, specs=specs)
    trained = len(model.safetensors_shapes([source.trained]))
    print(f"merged  {source.layout}: {len(specs)} tensors ({trained} trained), {count(specs):,d} params -> {out} "
          f"({out.stat().st_size / 1e9:.2f} GB)")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors" or out.is_dir():
        raise SystemExit(f"--out {out}: write a .safetensors file")
    source = model.open_checkpoint(args.src, args.init)
    if out.resolve() in {Path(f).resolve() for f in [*source.files, *([source.trained] if source.trained else [])]}:
        raise SystemExit(f"--out {out} is a file this conversion reads: write to another path")
    cast = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if source.trained is not None:
        return merge(source, out, cast, args)
    if source.cfg.pixel_head:
        raise SystemExit(f"--src {args.src} is already an L2P pixel model ({source.layout}); pass a latent source")
    flux2 = source.cfg.family == "flux2"
    if args.tail_modulation and not (flux2 and 0 < args.tail_modulation < source.cfg.num_single_layers):
        raise SystemExit(f"--tail-modulation {args.tail_modulation}: a FLUX.2 source and fewer than its "
                         "single-stream blocks")
    if args.align_data and args.recipe not in ("embedder", "lift"):
        raise SystemExit(f"--align-data: --recipe {args.recipe} fits nothing; use --recipe lift or embedder")
    target_cfg = model.l2p_config(source.cfg, args.patch, args.head_width, args.recipe, args.head_sigma, args.head_lift,
                                  args.head_tokens == "norm")
    target_cfg = replace(target_cfg, single_tail=args.tail_modulation) if flux2 else target_cfg
    with torch.device("meta"):
        target = model.new_model(target_cfg).state_dict()
    # the tail's private modulation starts as a copy of the shared one
    aliases = {k: "single_stream_modulation.linear.weight" for k in target
               if k.startswith("single_stream_modulation_tail.")}

    copied, dropped = {}, {}
    for key, spec in source.tensors(meta=True):
        if key in target and spec.shape == target[key].shape:
            copied[key] = spec.to(cast) if cast and spec.is_floating_point() else spec
        else:
            dropped[key] = spec
    new = ("pixel_embedder." if flux2 else f"all_x_embedder.{args.patch}-1.", "local_decoder.", "lift.")
    missing = [k for k in target if k not in copied and k not in aliases and not k.startswith(new)]
    if missing:
        raise SystemExit(f"--src {args.src} ({source.layout}) lacks {len(missing)} tensors the pixel model needs "
                         f"(first: {missing[:5]}); is it a complete transformer?")
    clock = time.time()
    aligned, fit_stats, kept = aligned_tensors(args, source, target_cfg) if args.recipe in ("embedder", "lift") else (
        {}, {}, [])
    fit_seconds, clock = time.time() - clock, time.time()
    created = new_tensors(target_cfg, args.seed, aligned)
    if args.head_steps:
        taught, loss = teach_head_to_decode(created, target_cfg, kept, args)
        created.update(taught)
        fit_stats.update(head_steps=str(args.head_steps), head_decode_loss=f"{loss:.5f}")
        del kept
    head_seconds = time.time() - clock
    created = {k: v.to(torch.float32 if k.startswith("lift.") else cast or torch.float32) for k, v in created.items()}

    specs = {**copied, **{k: copied[a] for k, a in aliases.items()}, **{k: v.to("meta") for k, v in created.items()}}

    def stream():
        kept = {}
        for key, tensor in source.tensors():
            if key in copied:
                yield key, tensor.to(copied[key].dtype)
                kept.update({key: tensor.to(copied[key].dtype).clone()} if key in aliases.values() else {})
        yield from ((k, kept[a]) for k, a in aliases.items())
        yield from created.items()

    metadata = {"format": "l2p", "l2p_patch": str(args.patch), "head_width": str(args.head_width),
                "source": str(args.src), "source_layout": source.layout, "seed": str(args.seed), "dtype": args.dtype,
                "written_by": "convert.py"}
    if args.head_tokens == "norm":  # read back by model.l2p_fields; none means raw, as in the released files
        metadata["l2p_head_tokens"] = "norm"
    if args.recipe != "paper":  # a file without l2p_recipe is the paper's, as the released ones
        metadata.update({"l2p_recipe": args.recipe, **fit_stats})
    sampler = source_sampler(args.src, source.cfg.family) if target_cfg.lift_dim else None
    if sampler:
        metadata["l2p_source_sampler"] = json.dumps(sampler)
    start = time.time()
    model.write_safetensors(out, stream(), metadata, specs=specs)

    embedder = next(k for k in created if not k.startswith("local_decoder.")).rsplit(".", 1)[0]
    print(f"source  {args.src} ({source.layout}): {len(copied) + len(dropped)} tensors")
    print(f"copied  {len(copied):4d} tensors {count(copied):>15,d} params  (bit-identical"
          f"{'' if cast is None else ', cast to ' + args.dtype})" + (f", and {', '.join(aliases)} from "
                                                                      "single_stream_modulation" if aliases else ""))
    print(f"created {len(created):4d} tensors {count(created):>15,d} params  "
          f"({embedder} [{target_cfg.dim}, {args.patch ** 2 * 3}]{', fitted' if aligned else ''}, local_decoder"
          f"{', lift' if target_cfg.lift_dim else ''}), recipe {args.recipe}")
    if fit_stats:
        print(f"fit     {fit_stats['align_images']} images: scale {fit_stats['align_scale_1k']} (1K), "
              f"{float(fit_stats['align_pixel_energy_in_subspace']):.1%} of the pixel energy in the subspace, "
              f"{float(fit_stats['align_latent_energy_unexplained']):.1%} of the latent energy unexplained, "
              f"{fit_seconds:.0f} s")
    if sampler:
        print(f"sampler the source's, sample.py's defaults: {sampler[0]} steps, CFG {sampler[1]}, shift "
              f"{sampler[2] or 'exp(mu)'} (x patch / 16)")
    if args.head_steps:
        print(f"head    {args.head_steps} steps decoding the lifted latents: x0 error {fit_stats['head_decode_loss']}, "
              f"{head_seconds:.0f} s")
    print(f"dropped {len(dropped):4d} tensors {count(dropped):>15,d} params  ({', '.join(dropped)})")
    print(f"wrote   {out}: {len(specs)} tensors, {count(specs):,d} params, {out.stat().st_size / 1e9:.2f} GB "
          f"in {time.time() - start:.0f} s")
    blocks = min(5, model.block_count(target_cfg) // 2)
    head_only = bool(target_cfg.lift_dim)  # train.py's default for a lifted init: the Detailer Head alone
    counts = model.trainable_counts(target_cfg, blocks, strict=False, head_only=head_only)
    print(f"freeze policy {'--trainable head' if head_only else f'--train-blocks {blocks}'}: "
          f"{counts['trainable']:,d} trainable, {counts['frozen']:,d} frozen parameters")


if __name__ == "__main__":
    model.run_script(main)
