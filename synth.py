"""
Generate L2P's training corpus: images of the source latent model (Z-Image, or FLUX.2 [klein]) for a list of prompts,
plus the prompts' text features, cached so that training never has to load the 4B text encoder.

    python synth.py --src Z-Image-Turbo/ --prompts builtin:10000 --out data/zimage-turbo-20k        # the paper's corpus
    torchrun --nproc_per_node=8 synth.py --src Z-Image-Turbo/ --prompts builtin:10000 --out data/zimage-turbo-20k
    python synth.py --src Z-Image/ --prompts my_prompts.csv --out data/zimage-base --res 768         # base model, CFG
    python synth.py --src FLUX.2-klein-base-4B/ --prompts builtin:10000 --out data/klein-base-20k   # the MMDiT source

L2P trains only on images its source generates (paper: 10k prompts x 2 seeds = 20k images at 1024^2): they lie on the
manifold the kept backbone already models, which is why the transfer converges fast (source-LDM data beats real
photos in the paper's ablation).

Output, in --out:
  images/<prompt index:06d>_s<seed index>.png  8-bit RGB; prompt, seed, steps, guidance, shift, source in PNG text
  features/<hash of the prompt>.safetensors    "cap" [L, D] bf16: the prompt's Qwen3 features, valid rows only, the
                                               prompt in the metadata (model.py's caption-feature cache, which
                                               train.py reads); also the empty negative prompt's when CFG is on.
                                               Z-Image: ~100 x 2560 (~0.5 MiB a prompt); FLUX.2: all 512 positions x
                                               7680, 7.5 MiB a prompt (75 GB for 10k prompts: the pads depend on the
                                               prompt, so none can be dropped). Cached anyway: encoding on the fly
                                               would keep the 8 GB encoder beside the DiT in training.
  metadata.jsonl                               one row per image, sorted by prompt index then seed index
  synth_config.json                            the corpus settings; a rerun with other settings is refused
  grid.png                                     thumbnails of the first images, for a quick look

Seeds: image j of prompt i uses seed --seed + i * --seeds + j. Its noise depends on that seed alone
(model.noise_for_seeds) and each prompt is encoded on its own, so with --batch-size 1 an image is bit-identical
whatever the number of GPUs or the point a run was resumed from.

Resume: run the same command again. An image counts as done only if it is under its final name (every file is written
to a temp name, then renamed) and decodes; a features file only if it loads and holds that prompt. Temp files of a
killed run are never trusted and are deleted at the end. metadata.jsonl is rebuilt at the end from what is on disk.

Several GPUs: torchrun --nproc_per_node=K. Job k = (prompt k // seeds, seed index k % seeds) belongs to rank k % K.
The features file of a prompt is written by the rank that owns its first image; any other rank that needs the
features and does not find the file encodes the prompt itself (same result) rather than waiting. Rank 0 writes
metadata.jsonl and grid.png once every rank is done.
"""

import argparse
import hashlib
import json
import os
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import model

# ----------------------------------------------------------------------------------------------------------------
# Built-in prompts: the paper's taxonomy (4 super-classes, 17 sub-classes, in synth_prompts.json), composed
# deterministically
# ----------------------------------------------------------------------------------------------------------------

_BUILTIN = json.loads(Path(__file__).with_name("synth_prompts.json").read_text(encoding="utf-8"))
PROMPT_TAXONOMY, STYLE_POOLS, PROMPT_LENGTH = _BUILTIN["taxonomy"], _BUILTIN["style_pools"], _BUILTIN["length"]
SUBCLASSES = [(sup, sub) for sup, subs in PROMPT_TAXONOMY.items() for sub in subs]


def builtin_category(index: int) -> tuple[str, str]:
    """(super-class, sub-class) of built-in prompt `index`: the 17 sub-classes take turns."""
    return SUBCLASSES[index % len(SUBCLASSES)]


def compose_prompt(rng: random.Random, spec: dict) -> str:
    """One prompt: '<medium> <subject> <setting>. <detail>. [<detail>.] <camera>, <light>, <palette>. [<finish>.]',
    optional sentences added while the prompt is shorter than a target length drawn in the 200-350 range."""
    def pick(pool):
        own = spec.get(pool)
        return rng.choice(own if own and rng.random() < 0.5 else STYLE_POOLS[pool])

    subject = rng.choice(spec["subjects"])
    if "{text}" in subject:
        subject = subject.format(text=rng.choice(spec["texts"]))
    core = f"{pick('mediums')} {subject} {rng.choice(spec['settings'])}."
    first, second = (d + "." for d in rng.sample(spec["details"], 2))
    camera = rng.choice(STYLE_POOLS["cameras"])
    look = f"{camera[0].upper()}{camera[1:]}, {pick('lights')}, {rng.choice(STYLE_POOLS['palettes'])}."
    finish = rng.choice(STYLE_POOLS["finishes"]) + "."
    target = rng.randint(PROMPT_LENGTH[0] + 20, PROMPT_LENGTH[1] - 20)
    sentences = [core, first, look]
    for extra, where in ((second, 2), (finish, None)):
        longer = sentences[:where] + [extra] + (sentences[where:] if where is not None else [])
        if len(" ".join(sentences)) < target and len(" ".join(longer)) <= PROMPT_LENGTH[1]:
            sentences = longer
    return " ".join(sentences)


def builtin_prompts(n: int) -> list[str]:
    """n distinct prompts over PROMPT_TAXONOMY, the same for the same n, and builtin_prompts(k) is a prefix of
    builtin_prompts(n) for k < n: prompt i comes from its own seeded generator (redrawn if it repeats one before it)."""
    prompts, seen = [], set()
    for index in range(n):
        super_class, sub_class = builtin_category(index)
        rng = random.Random(index)
        prompt = compose_prompt(rng, PROMPT_TAXONOMY[super_class][sub_class])
        while prompt in seen:
            prompt = compose_prompt(rng, PROMPT_TAXONOMY[super_class][sub_class])
        seen.add(prompt)
        prompts.append(prompt)
    return prompts


def read_prompts(spec: str) -> list[str]:
    """--prompts: builtin:N, or a file model.read_prompt_file reads."""
    if not spec.startswith("builtin:"):
        return model.read_prompt_file(spec)
    count = spec.removeprefix("builtin:")
    if not count.isdigit() or int(count) < 1:
        raise SystemExit(f"--prompts {spec}: builtin:N needs a positive whole number N, e.g. builtin:10000")
    return builtin_prompts(int(count))


# ----------------------------------------------------------------------------------------------------------------
# Settings: the source's own sampling defaults, validated inputs, the corpus fingerprint
# ----------------------------------------------------------------------------------------------------------------

NEGATIVE_PROMPT = ""
# The settings that decide what the images are; a rerun into the same --out must match them all.
CORPUS_KEYS = ("source", "prompts_sha256", "num_prompts", "seeds", "seed", "width", "height", "steps",
               "guidance", "shift", "dtype")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True,
                        help="the source repo root (transformer/, text_encoder/, tokenizer/, vae/, scheduler/), e.g. a "
                             "download of Tongyi-MAI/Z-Image-Turbo or black-forest-labs/FLUX.2-klein-base-4B")
    parser.add_argument("--prompts", required=True,
                        help="builtin:N (N prompts composed over the paper's 4 super-classes / 17 sub-classes; "
                             "builtin:10000 is the paper's count), a text file with one prompt per line (blank lines "
                             "skipped), or a .jsonl / .csv file with a prompt, text or caption column")
    parser.add_argument("--out", required=True, help="output folder; rerun the same command to resume it")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt, each from its own seed (paper: 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed: image j of prompt i uses seed + i * seeds + j")
    parser.add_argument("--res", type=int, default=1024,
                        help="square image size in pixels, a multiple of 16 (8x VAE x 2x2 latent patch); paper: 1024")
    parser.add_argument("--width", type=int, help="image width, overrides --res (a multiple of 16)")
    parser.add_argument("--height", type=int, help="image height, overrides --res (a multiple of 16)")
    parser.add_argument("--steps", type=int,
                        help="Euler steps. Default from the source: Z-Image-Turbo (scheduler shift 3) 8, Z-Image base "
                             "50; klein (model_index.json is_distilled) 4, klein-base 50")
    parser.add_argument("--cfg", type=float,
                        help="classifier-free guidance c, v = v_neg + c (v_pos - v_neg) with the empty negative "
                             "prompt; 1 = off. Default from the source, like --steps: Turbo 1, Z-Image base 5 "
                             "(its own w = 4, c = 1 + w), klein 1, klein-base 4")
    parser.add_argument("--shift", type=float,
                        help="sigma shift of the sampler; default: Z-Image's scheduler_config.json shift, or FLUX.2's "
                             "exp(mu) for the image's token count and the steps")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per DiT batch. 1 (default) keeps every image bit-identical whatever the batching, "
                             "rank count or resume point; at 1024^2 one image is already a 4096-token DiT pass. Larger "
                             "helps small sizes, but images then depend on their batch companions in the last bits "
                             "(bf16 on GPU: up to 1 level on a few percent of pixels)")
    parser.add_argument("--no-features", dest="features", action="store_false",
                        help="do not cache the prompts' text features in features/ (training then has to run the "
                             "text encoder itself)")
    parser.add_argument("--device", help="torch device; default cuda if available (cuda:LOCAL_RANK under torchrun), "
                                         "else cpu")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="DiT and text encoder precision; auto = bf16 on cuda, fp32 on cpu. The VAE always runs "
                             "in fp32, as in the official code")
    args = parser.parse_args(argv)
    model.check_finite(parser, args)
    return args


def check_source(src: Path) -> int:
    """The caption feature width of a source repo root (Z-Image or FLUX.2 [klein]), reading only configs and headers."""
    if not src.is_dir():
        raise SystemExit(f"--src {src}: not a folder; pass a source repo root such as a download of "
                         "Tongyi-MAI/Z-Image-Turbo or black-forest-labs/FLUX.2-klein-base-4B")
    missing = [f"{name}/" for name in ("transformer", "text_encoder", "vae") if not (src / name).is_dir()]
    if missing:
        raise SystemExit(f"--src {src} is not a source repo: it has no {', '.join(missing)}. Pass the repo root that "
                         "holds transformer/, text_encoder/, tokenizer/, vae/ and scheduler/ (the published layout)")
    try:
        cfg = model.open_checkpoint(src).cfg
        model.safetensors_shapes(model.safetensors_files(src / "vae"))
        model.check_text_encoder(src, cfg)
    except (model.CheckpointError, OSError) as e:
        raise SystemExit(f"--src {src}: {e}") from None
    if cfg.pixel_head:
        raise SystemExit(f"--src {src} is an L2P pixel model; synth.py generates with the latent source model")
    return cfg.cap_feat_dim


def resolve_settings(args, device: torch.device) -> tuple[dict, list[str], int]:
    """(corpus settings, prompts, caption feature width) from the arguments; SystemExit on anything invalid."""
    width, height = (args.res if size is None else size for size in (args.width, args.height))
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise SystemExit(f"image size {width}x{height}: width and height must be positive multiples of 16 (the "
                         "8x VAE times the 2x2 latent patch); e.g. --res 1024, or --width 1216 --height 832")
    for flag, value, least in (("--seeds", args.seeds, 1), ("--seed", args.seed, 0),
                               ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                               ("--cfg", args.cfg, 1)):
        if value is not None and value < least:
            raise SystemExit(f"{flag} {value}: must be at least {least}")
    if args.seed >= 2 ** 62:  # image seeds are seed + offsets; torch's generator takes a signed 64-bit seed
        raise SystemExit(f"--seed {args.seed}: must be below 2^62")
    if args.shift is not None and args.shift <= 0:
        raise SystemExit(f"--shift {args.shift}: must be positive (Z-Image-Turbo uses 3, Z-Image 6)")
    src = Path(args.src).resolve()
    cap_dim = check_source(src)
    prompts = read_prompts(args.prompts)
    try:  # Z-Image-Turbo (shift 3): 8 steps, no CFG; base (shift 6): 50, c = 5; FLUX.2 klein-base: 50, c = 4
        preset = model.source_sampler_settings(src, height, width, args.steps)
    except (model.CheckpointError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--src {src}: {e}") from None
    settings = dict(source=src.name, prompts_sha256=hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                    num_prompts=len(prompts), seeds=args.seeds, seed=args.seed, width=width, height=height,
                    steps=args.steps or preset["steps"],
                    guidance=float(preset["guidance"] if args.cfg is None else args.cfg),
                    shift=float(args.shift or preset["shift"]),
                    dtype="bf16" if args.dtype == "bf16" or args.dtype == "auto" and device.type == "cuda" else "fp32")
    return settings, prompts, cap_dim


def check_corpus(out: Path, settings: dict, extra: dict, write: bool) -> None:
    """Refuse an --out that holds a corpus made with other settings; record the settings of a new one."""
    path = out / "synth_config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path} is unreadable ({e}); pass a new --out") from None
        changed = [f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in CORPUS_KEYS if old.get(k) != settings[k]]
        if changed:
            raise SystemExit(f"--out {out} holds a corpus made with other settings ({'; '.join(changed)}). Rerun with "
                             "its settings to resume it, or pass a new --out")
    elif write:
        model.atomic_write(path, json.dumps({**settings, **extra}, indent=2).encode())


# ----------------------------------------------------------------------------------------------------------------
# Files: the "is it done" checks a resume relies on
# ----------------------------------------------------------------------------------------------------------------


def image_name(prompt_index: int, seed_index: int) -> str:
    return f"images/{prompt_index:06d}_s{seed_index}.png"


def png_done(path: Path, width: int, height: int) -> bool:
    """True if the image is there under its final name, decodes completely and has the corpus size."""
    if not path.exists():
        return False
    try:
        with Image.open(path) as image:
            image.load()
            return image.mode == "RGB" and image.size == (width, height)
    except Exception:  # whatever makes it unreadable (truncated, not a PNG, bad CRC), it is not done
        return False


def write_grid(out: Path, files: list[str], columns: int = 8, thumb: int = 128) -> None:
    """grid.png: thumbnails of `files` (paths under out), `columns` per row."""
    thumbs = []
    for name in files:
        with Image.open(out / name) as image:
            width = min(thumb, image.width)
            size = (width, round(width * image.height / image.width))
            thumbs.append(np.asarray(image.convert("RGB").resize(size, Image.LANCZOS)))
    model.save_png(out / "grid.png", model.image_grid(thumbs, columns))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

GRID_IMAGES = 32


def rank_jobs(num_jobs: int, rank: int, world: int) -> range:
    """Job k = (prompt k // seeds, seed index k % seeds) belongs to rank k % world."""
    return range(rank, num_jobs, world)


def image_seed(settings: dict, prompt_index: int, seed_index: int) -> int:
    return settings["seed"] + prompt_index * settings["seeds"] + seed_index


def gather_features(out: Path, src: Path, prompts: list[str], mine: list, pending: list, settings: dict,
                    cache: bool, cap_dim: int, rank: int, device, dtype, show: bool) -> tuple[dict, int]:
    """The features the pending images need (prompt -> [L, D] bf16 on cpu), and how many prompts were encoded.

    This rank also owns cache files: a prompt's, when it owns the prompt's first image; the negative prompt's on
    rank 0. Files that load are used; the rest is encoded (and cached), and the text encoder freed before the DiT
    loads.
    """
    negative = [NEGATIVE_PROMPT] if settings["guidance"] != 1 else []
    needed = {prompts[i] for i, _ in pending} | set(negative if pending else [])
    owned = {prompts[i] for i, j in mine if j == 0} | set(negative if rank == 0 else []) if cache else set()
    features, stale = {}, set()
    for prompt in sorted(needed | owned):
        cap = model.read_caption_features(model.caption_features_path(out / "features", prompt), prompt)
        valid = cap is not None and cap.dtype == torch.bfloat16 and cap.shape[1] == cap_dim
        if not valid and prompt in owned:
            stale.add(prompt)
        if valid and prompt in needed:
            features[prompt] = cap
    to_encode = sorted((needed - features.keys()) | stale)
    if to_encode:
        encoded = model.encode_to_cache(src, to_encode, out / "features" if cache else None, device, dtype, show)
        features.update({prompt: encoded[prompt] for prompt in needed - features.keys()})
    return features, len(to_encode)


def write_metadata(out: Path, prompts: list[str], settings: dict) -> list[dict]:
    """metadata.jsonl from the images on disk, sorted by prompt index then seed index; returns its rows."""
    rows = []
    for i, prompt in enumerate(prompts):
        features = model.caption_features_path(out / "features", prompt)
        for j in range(settings["seeds"]):
            if (out / image_name(i, j)).exists():
                row = dict(file_name=image_name(i, j), prompt=prompt, seed=image_seed(settings, i, j),
                           source=settings["source"], steps=settings["steps"], guidance=settings["guidance"],
                           shift=settings["shift"], width=settings["width"], height=settings["height"])
                if features.exists():
                    row["features"] = features.relative_to(out).as_posix()
                rows.append(row)
    model.atomic_write(out / "metadata.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return rows


def make_images(out: Path, src: Path, prompts: list[str], pending: list, features: dict, settings: dict,
                batch_size: int, device, dtype, show: bool, world: int) -> int:
    """Generate and write the pending images, batch by batch; returns how many were written. PNG encoding runs in
    background threads while the GPU works on the next batch."""
    if not pending:
        return 0
    dit = model.load_model(src, device=device, dtype=dtype)
    vae = model.load_vae(src, device=device, dtype=torch.float32)
    model.check_vae_fits(vae, dit.cfg.in_channels * dit.cfg.patch_size ** 2, f"--src {src}: its vae/")
    neg = features.get(NEGATIVE_PROMPT) if settings["guidance"] != 1 else None
    written, saving = 0, deque()
    with ThreadPoolExecutor(2) as writer, tqdm(total=len(pending), desc=f"generating (rank 0 of {world})",
                                               unit="img", disable=not show) as bar:
        for b in range(0, len(pending), batch_size):
            batch = pending[b:b + batch_size]
            caps = [features[prompts[i]][None] for i, _ in batch]
            cap, mask = model.cat_captions(caps, [torch.ones(1, c.shape[1], dtype=torch.bool) for c in caps])
            seeds = [image_seed(settings, i, j) for i, j in batch]
            negative = {} if neg is None else dict(neg_cap=neg[None].expand(len(batch), -1, -1),
                                                   neg_mask=torch.ones(len(batch), len(neg), dtype=torch.bool))
            images = model.generate(dit, cap, mask, seeds, settings["height"], settings["width"], settings["steps"],
                                    settings["shift"], guidance=settings["guidance"], vae=vae, **negative)
            model.check_finite_images(images, f"--src {src}, CFG {settings['guidance']}, shift {settings['shift']:.3g}")
            for (i, j), seed, pixels in zip(batch, seeds, model.to_uint8(images)):
                text = dict(prompt=prompts[i], seed=seed, steps=settings["steps"], guidance=settings["guidance"],
                            shift=settings["shift"], source=settings["source"], software="l2p synth.py")
                saving.append(writer.submit(model.save_png, out / image_name(i, j), pixels, text))
            bar.update(len(batch))
            while saving and (saving[0].done() or len(saving) > 2 * batch_size):  # bounded, and errors surface
                saving.popleft().result()
                written += 1
        while saving:
            saving.popleft().result()
            written += 1
    return written


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    torch.set_flush_denormal(True)  # CPU: arithmetic on subnormal floats is many times slower
    rank, world, device = model.init_distributed(args.device)
    settings, prompts, cap_dim = resolve_settings(args, device)
    out, src = Path(args.out), Path(args.src).resolve()
    # Every rank checks (the same answer everywhere, so all of them stop on an error); rank 0 records a new corpus.
    check_corpus(out, settings, dict(source_path=str(src), prompts=args.prompts), write=rank == 0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[settings["dtype"]]
    show, n_seeds, width, height = rank == 0, settings["seeds"], settings["width"], settings["height"]

    # 1. What is left: this rank's images that are not on disk in full.
    mine = [divmod(k, n_seeds) for k in rank_jobs(len(prompts) * n_seeds, rank, world)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
        done = list(tqdm(pool.map(lambda job: png_done(out / image_name(*job), width, height), mine), total=len(mine),
                         desc="checking images", unit="img", disable=not show))
    pending = [job for job, ok in zip(mine, done) if not ok]

    # 2. Text features, then the text encoder is gone.
    features, encoded = gather_features(out, src, prompts, mine, pending, settings, args.features, cap_dim, rank,
                                        device, dtype, show)

    # 3. The images.
    generate_start = time.time()
    written = make_images(out, src, prompts, pending, features, settings, args.batch_size, device, dtype, show, world)
    if world > 1:
        print(f"rank {rank}/{world}: {written} images written, {len(mine) - len(pending)} already done, "
              f"{encoded} prompts encoded, {time.time() - generate_start:.1f} s generating")

    # 4. Once every rank is done, rank 0 rebuilds metadata.jsonl and grid.png from what is on disk.
    counts = torch.tensor([written, len(mine) - len(pending), encoded], device=device)
    if world > 1:
        dist.all_reduce(counts)  # also the meeting point: it returns once every rank has finished its images
    model.finish_distributed()
    written, skipped, encoded = counts.tolist()
    summary = dict(written=written, skipped=skipped, encoded=encoded, seconds=time.time() - start)
    if rank != 0:
        return summary
    for folder in (out, out / "images", out / "features"):
        for tmp in folder.glob(".*.tmp"):  # a killed run's partial writes; every rank has finished its own
            tmp.unlink(missing_ok=True)
    rows = write_metadata(out, prompts, settings)
    if rows:
        write_grid(out, [row["file_name"] for row in rows[:GRID_IMAGES]])
    total = len(prompts) * n_seeds
    print(f"{out}: {len(rows)}/{total} images ({written} written now, {skipped} already done), {encoded} prompts "
          f"encoded, {summary['seconds']:.1f} s, {written / summary['seconds']:.2f} images/s overall; "
          f"metadata.jsonl, grid.png")
    return summary | dict(images=len(rows))


if __name__ == "__main__":
    model.run_script(main)
