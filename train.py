"""
Train the L2P pixel model: its shallow layers learn pixels while the frozen middle of the Z-Image DiT stays as is.

    python train.py --init l2p-init-1k.safetensors --data synth/ --out runs/l2p           # one GPU
    torchrun --nproc_per_node=8 train.py --init l2p-init-1k.safetensors --data synth/ --out runs/l2p
    python train.py ... --resume                                                          # continue a run exactly
    python train.py --plan-only                                                           # real-size memory plan

Objective (L2P.md): pixels x0 in [-1, 1], sigma one of 1000 shift-3 steps, x_sigma = (1 - sigma) x0 + sigma eps,
plain fp32 MSE between the predicted v and eps - x0. AdamW, lr 5e-5, weight decay 0.01, global batch 8.
What trains is model.set_trainable's policy (--train-blocks, --strict-freeze).

Precision: every weight the network computes with is in --dtype (bf16): frozen weights only ever exist that way.
The trainable ones also have fp32 master copies; the backward pass adds each bf16 gradient into an fp32
accumulator and frees it at once (a post-accumulate-grad hook), so micro-batches accumulate in fp32, and AdamW
updates the fp32 masters, which are then copied back into the bf16 weights.

Where the masters, their AdamW state and the accumulators live is the memory mode:
  standard    on the GPU. Chosen on cards of 40 GB or more when the plan fits.
  low memory  on the CPU (pinned, copies overlapped with the backward pass; fused CPU AdamW): the GPU holds only
              the bf16 weights and the activations, so the full 6.17B model trains on one 24 GB card.
Measured on an H200 (random weights, 1024^2, micro-batch 1, captions of 200 tokens): peak 15.0 GiB in low-memory
mode (plan 16.2; it needs ~43 GiB of host memory), 53.0 GiB in standard mode (plan 54.1). --plan-only prints the
plan of each mode. With several processes (torchrun) the masters are sharded: each rank owns a balanced share of
the trainable tensors, gradients are reduced onto their owner, the owner steps and broadcasts the new weights
(ZeRO stage 1, written with torch.distributed collectives: DistributedDataParallel would all-reduce bf16 .grad
tensors that must stay allocated, which the fp32 accumulation above replaces).

Everything random (data order, sigma, noise) is drawn from (--seed, sample position), so a run gives the same
result with any number of processes or micro-batches, and --resume continues it exactly.

Writes in --out: trained.safetensors (only the trained tensors + the path of the init: model.load_model and
sample.py load it over its init; `convert.py --src trained.safetensors --out merged.safetensors` merges),
trained_ema.safetensors (with --ema), train_state.pt (optimizer, EMA, step), log.jsonl, samples/step_*.png,
features/ (captions encoded by --text-encoder).
"""

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
import resource
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence

import model

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = parser.add_argument_group("inputs and outputs")
    io_.add_argument("--init", help="the L2P checkpoint to start from (convert.py output, .safetensors)")
    io_.add_argument("--data", help="training data: a synth.py output folder, a folder of images with metadata.jsonl "
                                    "or metadata.csv, or a folder of webdataset .tar shards")
    io_.add_argument("--out", help="run folder: checkpoints, train_state.pt, log.jsonl, samples/")
    io_.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint (same settings; same result as a run "
                          "that was never interrupted)")
    io_.add_argument("--text-encoder",
                     help="Z-Image repo root, its text_encoder/ folder or qwen_3_4b.safetensors: encodes the captions "
                          "that come without cached features (once, at startup, into <out>/features/), and the "
                          "empty negative prompt of the samples")

    opt = parser.add_argument_group("objective and optimizer (defaults: the paper's recipe)")
    opt.add_argument("--max-steps", type=int, default=10_000,
                     help="optimizer steps (global batches); the paper does not publish its count: 10k steps are "
                          "4 epochs of its 20k images")
    opt.add_argument("--batch-size", type=int, default=8, help="global batch, over all processes")
    opt.add_argument("--micro-batch", type=int,
                     help="samples per process per forward pass; gradients accumulate up to --batch-size. Default: "
                          "the largest that the memory plan fits on the GPU (all of the process's share on CPU)")
    opt.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (betas are torch's defaults)")
    opt.add_argument("--head-lr-fan-in", type=int, default=0, metavar="N",
                     help="0 (the paper): one lr for everything. N > 0: each Detailer Head convolution with a fan-in "
                          "k = input channels x kernel area above N learns at lr x N / k (muP's rule for Adam). At a "
                          "high lr, AdamW's same-sign steps on a wide conv fed by SiLU outputs (positive mean) can "
                          "push its pre-activations far below zero: the deepest decoder conv dies, and the head "
                          "stops depending on the DiT's tokens, i.e. on the prompt (bench/shapes.py uses 288)")
    opt.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, on every trained tensor")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off")
    opt.add_argument("--warmup", type=int, default=100, help="linear learning-rate warmup in steps, constant after")
    opt.add_argument("--ema", type=float, default=0.0,
                     help="EMA decay of the trained weights, e.g. 0.9999 (0 = off; the release shows none); the "
                          "average is written to trained_ema.safetensors")
    opt.add_argument("--shift", type=float, default=3.0, help="sigma shift s: sigma = s u / (1 + (s - 1) u)")
    opt.add_argument("--seed", type=int, default=0, help="seeds data order, sigma and noise (sample by sample)")
    opt.add_argument("--train-blocks", type=int, default=5,
                     help="n: the first and last n main layers train, the rest of them stay frozen (the paper: 5)")
    opt.add_argument("--strict-freeze", action="store_true",
                     help="the paper's wording: only the patch embedder, the first and last n layers and the head "
                          "train (default: the released code's policy, which also trains refiners and embedders)")
    opt.add_argument("--res", type=int, default=1024,
                     help="training resolution: images are resized (shorter side) and centre-cropped to res x res; "
                          "a multiple of the model's patch")

    mem = parser.add_argument_group("precision and memory")
    mem.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                     help="weights the network computes with (frozen and trainable); masters are always fp32")
    mem.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                     help="recompute each DiT block in the backward pass instead of keeping its activations")
    mem.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                     help="keep fp32 masters, AdamW state and gradient accumulators on the CPU. Default: on for CUDA "
                          "cards under 40 GB or where the standard plan does not fit, else off")
    mem.add_argument("--device", help="cuda or cpu (default: cuda when available); with several processes, "
                                      "cuda:LOCAL_RANK")
    mem.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per training process")
    mem.add_argument("--plan-only", action="store_true",
                     help="print the memory plan of each mode and exit without loading any weight (real size, or "
                          "the --init checkpoint's size)")
    mem.add_argument("--size", choices=["real"], default="real",
                     help="--plan-only without --init: the real 6.17B L2P, patch 16")

    log = parser.add_argument_group("logging, samples and checkpoints")
    log.add_argument("--log-every", type=int, default=10, help="print and append to log.jsonl every N steps")
    log.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    log.add_argument("--sample-every", type=int, default=500,
                     help="write a grid of samples every N steps (0 = never): judge progress on them, the loss can "
                          "fall while samples stay noise")
    log.add_argument("--sample-count", type=int, default=4, help="samples per grid: the first prompts of the data")
    log.add_argument("--sample-steps", type=int, default=30, help="Euler steps per sample (released 1K: 30)")
    log.add_argument("--sample-guidance", type=float, default=2.0,
                     help="CFG scale c of the samples, v_neg + c (v_pos - v_neg) with the empty prompt (released "
                          "1K: 2.0); needs the empty prompt's features, else the samples are unguided")
    log.add_argument("--max-bad-steps", type=int, default=5,
                     help="steps in a row with a non-finite loss or gradient (each one skipped) before the run "
                          "stops with a checkpoint")
    args = parser.parse_args(argv)
    if args.head_lr_fan_in < 0:
        parser.error(f"--head-lr-fan-in must be >= 0 (0 = off), got {args.head_lr_fan_in}")
    if not args.plan_only:
        missing = [f"--{name}" for name in ("init", "data", "out") if getattr(args, name) is None]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --plan-only)")
    return args


# Settings that change the trajectory: a resumed run must use the ones it started with.
RUN_DEFINING = ("init", "data", "seed", "batch_size", "res", "shift", "train_blocks", "strict_freeze", "dtype")

# ----------------------------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------------------------

TRAIN_STEPS = 1000  # the grid of training sigmas: 1000 shifted steps, as the source was trained


def sample_sigmas(n: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """[n] fp32: u = k / 1000 with k uniform in 1..1000, then sigma = s u / (1 + (s - 1) u)."""
    u = torch.randint(1, TRAIN_STEPS + 1, (n,), generator=generator).double() / TRAIN_STEPS
    return (shift * u / (1 + (shift - 1) * u)).float()


def loss_fn(net, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, cap: torch.Tensor,
            cap_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching MSE [B] in fp32: ||v(x_sigma) - (eps - x0)||^2 / numel."""
    s = sigma.view(-1, 1, 1, 1)
    v = net((1 - s) * x0 + s * noise, sigma, cap, cap_mask)
    return (v.float() - (noise - x0)).square().mean(dim=(1, 2, 3))


def lr_at(step: int, args) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then constant."""
    return args.lr * min(1.0, step / max(1, args.warmup))


def derived_seed(seed: int, stream: str, counter: int) -> int:
    """A seed for one draw (stream 'noise' of sample 1234, ...) from the run seed alone: counter-based, so any rank,
    worker or resumed run draws the same numbers for the same sample."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{counter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FIELDS = ("prompt", "text", "caption")
IMAGE_FIELDS = ("file_name", "image")


@dataclass
class Record:
    """One training sample on disk. A tar member is `image` (the shard) at byte `offset`, `size` bytes long."""
    image: str
    caption: str
    features: str | None = None  # safetensors with "cap" [L, D]: the caption's valid text-encoder rows
    offset: int = -1
    size: int = 0
    name: str = ""  # how the log names it

    def read_image_bytes(self) -> bytes:
        with open(self.image, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def _field(row: dict, names: tuple[str, ...], what: str, where: str) -> str:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    raise SystemExit(f"{where}: no {what} (looked for {' / '.join(names)}; the row has {sorted(row)}). Each row "
                     "needs file_name or image, and prompt, text or caption")


def records_from_metadata(folder: Path) -> list[Record]:
    """synth.py output or a DiffSynth-style folder: metadata.jsonl (preferred) or metadata.csv, paths relative to it."""
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists():
        rows = []
        for i, line in enumerate(jsonl.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append((f"{jsonl}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{jsonl}:{i + 1} is not JSON ({e}); fix or remove that line") from None
    else:
        with open(table, newline="") as f:
            rows = [(f"{table}:{i + 2}", row) for i, row in enumerate(csv.DictReader(f))]
    records = []
    for where, row in rows:
        file = _field(row, IMAGE_FIELDS, "image file", where)
        features = row.get("features") or None
        records.append(Record(str(folder / file), _field(row, CAPTION_FIELDS, "caption", where),
                              str(folder / features) if features else None, name=file))
    return records


def records_from_shards(shards: list[Path]) -> tuple[list[Record], int]:
    """Webdataset tar shards: members sharing a key (path up to the first dot of the file name) form a sample, an
    image (jpg/png/webp) and a caption (.txt, or .json with prompt/caption/text). Images are read in place later,
    by offset. Returns the records and how many keys lacked an image or a caption."""
    records, incomplete = [], 0
    for shard in shards:
        try:
            tar = tarfile.open(shard, "r:")  # uncompressed only: members are then read by offset, in any order
        except tarfile.ReadError as e:
            raise SystemExit(f"{shard}: not an uncompressed tar ({e}); webdataset shards are plain .tar "
                             "files") from None
        samples: dict[str, dict] = {}
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")
                sample = samples.setdefault(f"{folder}/{key}", {})
                ext = "." + ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    sample["image"] = member
                elif ext == ".txt":
                    sample["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
                elif ext == ".json":
                    meta = json.loads(tar.extractfile(member).read())
                    caption = next((meta[f] for f in CAPTION_FIELDS if meta.get(f)), None)
                    if caption is not None:
                        sample["caption"] = str(caption)
        for key, sample in samples.items():
            if "image" not in sample or "caption" not in sample:
                incomplete += 1
                continue
            member = sample["image"]
            records.append(Record(str(shard), sample["caption"], offset=member.offset_data, size=member.size,
                                  name=f"{shard.name}:{member.name}"))
    return records, incomplete


def find_records(data: Path) -> list[Record]:
    """Every sample of --data, in a fixed order (file order, shards sorted by name)."""
    if not data.exists():
        raise SystemExit(f"--data {data} does not exist")
    if data.is_dir() and ((data / "metadata.jsonl").exists() or (data / "metadata.csv").exists()):
        records = records_from_metadata(data)
    else:
        shards = [data] if data.suffix == ".tar" else sorted(data.glob("*.tar")) if data.is_dir() else []
        if not shards:
            raise SystemExit(f"--data {data}: found no metadata.jsonl, no metadata.csv and no *.tar shards. Pass a "
                             "synth.py output, a folder of images with metadata.jsonl/.csv (file_name + prompt), or "
                             "a folder of webdataset .tar shards")
        records, incomplete = records_from_shards(shards)
        if incomplete:
            print(f"data: {incomplete} keys in the shards lack an image or a caption and are left out")
    if not records:
        raise SystemExit(f"--data {data} holds no sample")
    return records


def load_image(record: Record, res: int) -> torch.Tensor:
    """[3, res, res] fp32 in [-1, 1]: the shorter side resized to res (Lanczos), then the centre crop."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(record.read_image_bytes())) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    scale = res / min(w, h)
    if scale != 1:
        image = image.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.Resampling.LANCZOS)
    w, h = image.size
    left, top = (w - res) // 2, (h - res) // 2
    pixels = np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Item (index, position) -> one training sample: record `index` at --res with its caption features, and the
    sigma and noise of global sample `position`, drawn from (seed, position) alone.

    An image that does not decode yields a zero image with weight 0 (a batch keeps its shape, so every process runs
    the same passes), and the error, for the log.
    """

    def __init__(self, records: list[Record], res: int, seed: int, shift: float):
        self.records, self.res, self.seed, self.shift = records, res, seed, shift

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, position = item
        record = self.records[index]
        g = torch.Generator().manual_seed(derived_seed(self.seed, "sample", position))
        sigma = sample_sigmas(1, self.shift, g)[0]
        noise = torch.randn(3, self.res, self.res, generator=g)
        cap = dict(model.read_tensors([Path(record.features)]))["cap"].float()
        try:
            image, error = load_image(record, self.res), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... for bad files
            image, error = torch.zeros(3, self.res, self.res), f"{type(e).__name__}: {e}"
        return dict(index=index, image=image, error=error, noise=noise, sigma=sigma, cap=cap)


def collate(samples: list[dict]) -> dict:
    """Stack a micro-batch; captions of different lengths are right-padded with zero rows and masked."""
    caps = [s["cap"] for s in samples]
    return dict(image=torch.stack([s["image"] for s in samples]), noise=torch.stack([s["noise"] for s in samples]),
                sigma=torch.stack([s["sigma"] for s in samples]),
                weight=torch.tensor([float(s["error"] is None) for s in samples]),
                cap=pad_sequence(caps, batch_first=True),
                cap_mask=pad_sequence([torch.ones(len(c), dtype=torch.bool) for c in caps], batch_first=True),
                errors=[(s["index"], s["error"]) for s in samples if s["error"] is not None])


class StepSampler(torch.utils.data.Sampler):
    """(record index, global sample position) for this rank, from step `start` to `end`.

    The global stream of positions is cut into steps of batch_size; rank r takes the r-th contiguous slice of each.
    Record indices follow one seeded permutation per epoch, so the order depends on the seed and nothing else.
    """

    def __init__(self, n_records: int, batch_size: int, rank: int, world: int, seed: int, start: int, end: int):
        self.n, self.batch_size, self.rank, self.world = n_records, batch_size, rank, world
        self.seed, self.start, self.end = seed, start, end

    def __len__(self):
        return max(0, self.end - self.start) * self.batch_size // self.world

    def __iter__(self):
        per_rank = self.batch_size // self.world
        epoch, order = -1, None
        for step in range(self.start, self.end):
            first = step * self.batch_size + self.rank * per_rank
            for position in range(first, first + per_rank):
                if position // self.n != epoch:
                    epoch = position // self.n
                    g = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
                    order = torch.randperm(self.n, generator=g).tolist()
                yield order[position % self.n], position


# ----------------------------------------------------------------------------------------------------------------
# Caption features
# ----------------------------------------------------------------------------------------------------------------


def feature_path(cache: Path, caption: str) -> Path:
    return cache / f"{hashlib.sha256(caption.encode()).hexdigest()[:40]}.safetensors"


def encode_missing(texts: list[str], args, cache: Path, device: torch.device, rank: int, world: int):
    """Encode the texts without a cached file once, shared out over the ranks; the encoder is released after."""
    barrier()  # every rank lists the same missing files before any rank writes one
    todo = [t for t in texts if not feature_path(cache, t).exists()]
    mine = todo[rank::world]
    if rank == 0 and todo:
        print(f"text encoder: encoding {len(todo)} captions with {args.text_encoder} into {cache}")
    if mine:
        cache.mkdir(parents=True, exist_ok=True)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        encoder = model.load_text_encoder(args.text_encoder, device=device, dtype=dtype)
        for i in range(0, len(mine), 16):
            batch = mine[i:i + 16]
            cap, mask = encoder.encode(batch)
            for text, rows, valid in zip(batch, cap, mask):
                model.write_safetensors(feature_path(cache, text), {"cap": rows[valid].cpu().contiguous()})
        encoder.release()  # before the DiT loads: it needs the memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    barrier()


def prepare_features(records: list[Record], args, cfg: model.ZImageConfig, device, rank, world
                     ) -> tuple[Path | None, int]:
    """Give every record a features file. Returns the empty prompt's features (for CFG samples; None when
    unavailable) and the longest caption in tokens.

    Rows with cached features (synth.py) use them; the others need --text-encoder, which encodes their captions
    into <out>/features/ once (kept for resumed runs).
    """
    cache = Path(args.out) / "features"
    uncached = sorted({r.caption for r in records if r.features is None})
    wants_negative = args.sample_every > 0 and args.sample_guidance != 1
    if uncached and args.text_encoder is None:
        missing = [c for c in uncached if not feature_path(cache, c).exists()]
        if missing:
            raise SystemExit(f"{len(missing)} of {len(records)} samples have no cached text features (first caption: "
                             f"{missing[0][:60]!r}); pass --text-encoder <Z-Image repo root or text_encoder/> to "
                             "encode them")
    if args.text_encoder is not None:
        encode_missing(uncached + [""] * wants_negative, args, cache, device, rank, world)
    for r in records:
        if r.features is None:
            r.features = str(feature_path(cache, r.caption))
    longest = check_features(records, cfg)
    negative = feature_path(cache, "")
    if wants_negative and not negative.exists():
        if rank == 0:
            print("samples: no features of the empty prompt (pass --text-encoder once), so samples are unguided")
        return None, longest
    return (negative if wants_negative else None), longest


def check_features(records: list[Record], cfg: model.ZImageConfig) -> int:
    """Every features file exists and holds "cap" [L >= 1, cap_feat_dim]; returns the longest L."""
    longest = 0
    for path in sorted({r.features for r in records}):
        if not Path(path).exists():
            raise SystemExit(f"features file {path} is missing; regenerate it, or drop the 'features' column and "
                             "pass --text-encoder")
        header, _ = model.safetensors_header(Path(path))
        shape = header.get("cap", {}).get("shape")
        if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] != cfg.cap_feat_dim:
            raise SystemExit(f"features file {path}: expected a tensor 'cap' [L, {cfg.cap_feat_dim}] (the text "
                             f"encoder's valid rows for this model), found {shape if shape else sorted(header)}")
        longest = max(longest, shape[0])
    return longest


# ----------------------------------------------------------------------------------------------------------------
# Memory plan
# ----------------------------------------------------------------------------------------------------------------

# Tensors of one DiT block kept for its backward pass, per token, in units of [dim] and [ffn_dim] rows (counted in
# DiTBlock.forward: norms, modulation, q k v before and after norm and RoPE, attention output, projections, the
# three SwiGLU products), plus those alive while its gradients are formed.
BLOCK_DIM_ROWS, BLOCK_FFN_ROWS = 22, 7
# Detailer Head, per pixel of a level with c channels (its input having c_in): encoder conv in/out, skip, decoder
# upsample, concat (2c), conv out and activation, plus the gradients alive at the widest level.
HEAD_ROWS_C, HEAD_ROWS_CIN = 8, 4
GIB = 2 ** 30


def plan_counts(cfg: model.ZImageConfig, train_blocks: int, strict: bool) -> dict:
    """Parameter counts of the freeze policy, from a meta-device model (no memory)."""
    with torch.device("meta"):
        net = model.ZImageDiT(cfg)
    trainable, frozen = model.set_trainable(net, train_blocks, strict)
    largest = max(p.numel() for p in net.parameters() if p.requires_grad)
    head_channels = [c for _, c in net.local_decoder.levels]  # shallow to deep
    return dict(trainable=trainable, frozen=frozen, largest=largest, head_channels=head_channels)


def activation_bytes(cfg: model.ZImageConfig, head_channels: list[int], res: int, micro_batch: int,
                     caption_tokens: int, elem: int, checkpointing: bool) -> int:
    """Activations of one forward + backward pass (micro-batch at res x res, captions of caption_tokens)."""
    p, dim, ffn = cfg.patch_size, cfg.dim, cfg.ffn_dim
    n_img, n_cap = model.round_up((res // p) ** 2), model.round_up(caption_tokens)
    seq = n_img + n_cap
    block = lambda s: s * (BLOCK_DIM_ROWS * dim + BLOCK_FFN_ROWS * ffn) * elem
    runs = [n_img] * cfg.n_refiner_layers + [n_cap] * cfg.n_refiner_layers + [seq] * cfg.n_layers
    if checkpointing:  # each block keeps its input; one block at a time is recomputed in full
        dit = sum(runs) * dim * elem + block(seq)
    else:
        dit = sum(block(s) for s in runs)
    head, c_in, side = 0, cfg.in_channels, res
    for c in head_channels:
        head += side * side * (HEAD_ROWS_C * c + HEAD_ROWS_CIN * c_in) * elem
        c_in, side = c, side // 2
    pixels = 8 * 3 * res * res * 4  # x0, noise, x_sigma, v, target, difference... in fp32
    return micro_batch * (dit + head + pixels)


def memory_plan(cfg: model.ZImageConfig, counts: dict, *, res: int, micro_batch: int, caption_tokens: int,
                elem: int, low_memory: bool, world: int, ema: bool, checkpointing: bool) -> dict:
    """Bytes per process, split into what lives on the GPU and what on the host (low-memory mode)."""
    trainable, owned = counts["trainable"], math.ceil(counts["trainable"] / world)
    masters = {"fp32 gradient accumulators": 4 * trainable, "fp32 master weights (own shard)": 4 * owned,
               "AdamW state (own shard)": 8 * owned, "EMA (own shard)": 4 * owned * ema}
    gpu = {"frozen weights": elem * counts["frozen"], "trainable weights": elem * trainable,
           "gradients in flight (largest two)": 2 * elem * counts["largest"]}
    host = {}
    if low_memory:
        host = {"pinned gradient staging": elem * trainable, **masters}
        gpu["transfer buffer"] = 4 * counts["largest"]
    else:
        gpu.update(masters)
    gpu["activations"] = activation_bytes(cfg, counts["head_channels"], res, micro_batch, caption_tokens, elem,
                                          checkpointing)
    return dict(gpu={k: v for k, v in gpu.items() if v}, host={k: v for k, v in host.items() if v},
                gpu_total=sum(gpu.values()), host_total=sum(host.values()))


def format_plan(title: str, plan: dict) -> str:
    lines = [title]
    for where in ("gpu", "host"):
        for label, size in plan[where].items():
            lines.append(f"  {where:4s} {label:34s} {size / GIB:8.2f} GiB")
    lines.append(f"  total per GPU {plan['gpu_total'] / GIB:.2f} GiB, host {plan['host_total'] / GIB:.2f} GiB per "
                 "process (plus the CUDA context, ~0.5-1 GiB)")
    return "\n".join(lines)


def print_plans(args):
    """--plan-only: the plan of each mode, for the real-size L2P (or --init's size), without loading weights."""
    cfg = l2p_config_of(args.init) if args.init else model.l2p_config(model.ZImageConfig(), 16)
    counts = plan_counts(cfg, args.train_blocks, args.strict_freeze)
    elem = 2 if args.dtype == "bf16" else 4
    print(f"L2P p={cfg.patch_size} dim={cfg.dim} layers={cfg.n_layers}: {counts['trainable'] + counts['frozen']:,d} "
          f"params, {counts['trainable']:,d} trainable (--train-blocks {args.train_blocks}"
          f"{', strict' if args.strict_freeze else ''}), {args.res}^2, captions of 512 tokens (the maximum), "
          f"{args.dtype}, gradient checkpointing {'on' if args.grad_checkpointing else 'off'}")
    modes = [("standard, micro-batch 1, 8 GPUs (the paper's setup)", False, 8, 1),
             ("standard, micro-batch 1, 1 GPU (batch 8 by accumulation)", False, 1, 1),
             ("standard, micro-batch 2, 4 GPUs", False, 4, 2),
             ("low memory, micro-batch 1, 1 GPU (24 GB card)", True, 1, 1),
             ("low memory, micro-batch 1, 2 GPUs (host memory sharded)", True, 2, 1)]
    for title, low, world, micro in modes:
        plan = memory_plan(cfg, counts, res=args.res, micro_batch=micro, caption_tokens=512, elem=elem,
                           low_memory=low, world=world, ema=args.ema > 0, checkpointing=args.grad_checkpointing)
        print(format_plan(title, plan))


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (all no-ops in a single process)
# ----------------------------------------------------------------------------------------------------------------


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


# ----------------------------------------------------------------------------------------------------------------
# Trainable weights: fp32 masters, gradient accumulation, AdamW, EMA
# ----------------------------------------------------------------------------------------------------------------


def owners(shapes: dict[str, torch.Size], world: int) -> dict[str, int]:
    """Rank that owns each trainable tensor: largest first onto the least loaded rank (balanced, deterministic)."""
    load, owner = [0] * world, {}
    for name in sorted(shapes, key=lambda n: (-math.prod(shapes[n]), n)):
        rank = load.index(min(load))
        owner[name] = rank
        load[rank] += math.prod(shapes[name])
    return owner


def lr_scale(name: str, params: dict[str, torch.Tensor], head_fan_in: int) -> float:
    """The lr multiplier of one trained tensor: min(1, N / fan-in) for the Detailer Head's convolutions (a bias
    takes its weight's) under --head-lr-fan-in N, else 1."""
    if not head_fan_in or not name.startswith("local_decoder."):
        return 1.0
    weight = params[name.removesuffix(".bias") + ".weight" if name.endswith(".bias") else name]
    return min(1.0, head_fan_in / math.prod(weight.shape[1:]))


class MasterWeights:
    """fp32 master copies of the trainable weights, their gradient accumulators, AdamW and EMA (the own shard).

    The network's trainable weights stay in the compute dtype. A post-accumulate-grad hook moves each gradient into
    its fp32 accumulator as soon as the backward pass has formed it and frees it, so only a tensor or two of
    gradients exist in the compute dtype at any time. In low-memory mode the accumulators live on the CPU: the hook starts an async copy
    into pinned staging memory, and finish_backward() adds it up once the GPU is done.

    step(): gradients are summed onto their owner rank, the global norm is clipped, the owner updates its fp32
    masters with AdamW and broadcasts the new weights in the compute dtype to every rank.
    """

    def __init__(self, net: model.ZImageDiT, masters: dict[str, torch.Tensor], args, master_device: torch.device,
                 rank: int, world: int):
        self.params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        self.owner = owners({n: p.shape for n, p in self.params.items()}, world)
        self.rank, self.world, self.ema_decay = rank, world, args.ema
        self.compute_device = next(iter(self.params.values())).device
        self.staged = master_device.type != self.compute_device.type  # low memory: gradients leave the GPU
        pin = self.staged and self.compute_device.type == "cuda"
        self.grads = {n: torch.zeros(p.shape, dtype=torch.float32, device=master_device, pin_memory=pin)
                      for n, p in self.params.items()}
        self.staging = {n: torch.empty(p.shape, dtype=p.dtype, device=master_device, pin_memory=pin)
                        for n, p in self.params.items()} if self.staged else {}
        by_scale = {}  # lr multiplier -> own tensor names; the optimizer's state is indexed in this order
        for name in self.params:
            if self.owner[name] == rank:
                by_scale.setdefault(lr_scale(name, self.params, args.head_lr_fan_in), []).append(name)
        self.masters = {n: masters[n] for names in by_scale.values() for n in names}
        for name, master in self.masters.items():
            master.grad = self.grads[name]
        self.ema = {n: m.clone() for n, m in self.masters.items()} if args.ema else {}
        groups = [{"params": [self.masters[n] for n in names], "lr_scale": scale}
                  for scale, names in by_scale.items()]
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                                           fused=True) if self.masters else None
        self.fresh = set(self.params)  # accumulators not yet written this step: the first gradient is copied in
        self.pending = []  # staged gradients of the current backward pass
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name):
        def take_gradient(p):
            if self.staged:
                self.staging[name].copy_(p.grad, non_blocking=True)
                self.pending.append(name)
            else:
                self._accumulate(name, p.grad)
            p.grad = None
        return take_gradient

    def _accumulate(self, name: str, grad: torch.Tensor):
        if name in self.fresh:
            self.grads[name].copy_(grad)
            self.fresh.discard(name)
        else:
            self.grads[name].add_(grad)

    def finish_backward(self):
        """After each backward pass: add the staged gradients once their copies have landed."""
        if self.pending and self.compute_device.type == "cuda":
            torch.cuda.current_stream(self.compute_device).synchronize()
        for name in self.pending:
            self._accumulate(name, self.staging[name])
        self.pending = []

    def _on_compute_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.compute_device, non_blocking=True)

    def discard(self):
        """Drop the step's gradients (a skipped step): the next backward pass overwrites the accumulators."""
        self.fresh = set(self.params)

    def step(self, lr: float, grad_clip: float) -> float:
        """Reduce, clip and apply the step's gradients; returns the global gradient norm (no update if not finite)."""
        for name in self.fresh:  # a tensor that got no gradient this step contributes zero
            self.grads[name].zero_()
        self.fresh = set(self.params)
        if self.world > 1:  # sum onto the owner, through the compute device (NCCL needs GPU tensors)
            for name, grad in self.grads.items():
                buffer = self._on_compute_device(grad)
                dist.reduce(buffer, dst=self.owner[name])
                if self.owner[name] == self.rank and buffer is not grad:
                    grad.copy_(buffer)
        squares = torch.zeros((), dtype=torch.float64, device=self.compute_device)
        for name in self.masters:
            squares += self._on_compute_device(torch.linalg.vector_norm(self.grads[name]).double() ** 2)
        norm = all_sum(squares).sqrt().item()
        if not math.isfinite(norm):
            return norm
        grads = [m.grad for m in self.masters.values()]
        if grad_clip > 0 and norm > grad_clip and grads:
            torch._foreach_mul_(grads, grad_clip / (norm + 1e-6))
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            self.optimizer.step()
        if self.ema:
            torch._foreach_lerp_(list(self.ema.values()), list(self.masters.values()), 1 - self.ema_decay)
        with torch.no_grad():
            for name, p in self.params.items():
                if self.owner[name] == self.rank:
                    p.copy_(self.masters[name], non_blocking=True)
                if self.world > 1:
                    dist.broadcast(p, src=self.owner[name])
        return norm

    def gathered(self, source: str):
        """(name, fp32 CPU tensor) of every trainable tensor, masters or EMA, on every rank (collective)."""
        for name, p in self.params.items():
            local = (self.masters if source == "masters" else self.ema).get(name)
            if self.world == 1:
                yield name, local.cpu()
                continue
            buffer = (self._on_compute_device(local) if local is not None else
                      torch.empty(p.shape, dtype=torch.float32, device=self.compute_device))
            dist.broadcast(buffer, src=self.owner[name])
            yield name, buffer.cpu()

    def state_dict(self) -> dict:
        """AdamW and EMA state of the own shard, by tensor name (so a run can resume on another number of ranks)."""
        optimizer = self.optimizer.state_dict()["state"] if self.optimizer else {}
        names = list(self.masters)
        return {"adamw": {names[i]: {k: v.cpu() for k, v in s.items()} for i, s in optimizer.items()},
                "ema": {n: t.cpu() for n, t in self.ema.items()}}

    def load_state_dict(self, states: list[dict]):
        """Take the own shard out of the state files of all ranks (loaded lazily with mmap)."""
        adamw = {n: s for state in states for n, s in state["adamw"].items() if n in self.masters}
        ema = {n: t for state in states for n, t in state["ema"].items() if n in self.masters}
        if self.optimizer is not None and adamw:
            names = list(self.masters)
            missing = [n for n in names if n not in adamw]
            if missing:
                raise SystemExit(f"--resume: the optimizer state lacks {len(missing)} tensors (first: {missing[0]})")
            self.optimizer.load_state_dict({"state": {i: adamw[n] for i, n in enumerate(names)},
                                            "param_groups": self.optimizer.state_dict()["param_groups"]})
        if self.ema:
            if len(ema) != len(self.ema):
                raise SystemExit("--resume: the run's EMA state is missing; resume with the --ema it started with")
            for name, t in ema.items():
                self.ema[name].copy_(t)


# ----------------------------------------------------------------------------------------------------------------
# Model loading, checkpoints, samples, logging
# ----------------------------------------------------------------------------------------------------------------


def l2p_config_of(path) -> model.ZImageConfig:
    """The config of an L2P checkpoint (headers only); a latent Z-Image checkpoint is refused."""
    cfg = model.open_dit_checkpoint(path).cfg
    if not cfg.pixel_head:
        raise SystemExit(f"--init {path} is a latent Z-Image checkpoint; make the L2P init with "
                         "`python convert.py --src <Z-Image> --out l2p-init.safetensors` first")
    return cfg


def load_for_training(path: Path, args, device: torch.device, master_device: torch.device, rank: int, world: int):
    """The network (every weight in the compute dtype on `device`) and the fp32 masters of the tensors this rank owns
    (on master_device). Tensors stream from the file one at a time: frozen ones are never held in fp32."""
    checkpoint = model.open_dit_checkpoint(path)
    with torch.device("meta"):
        net = model.ZImageDiT(checkpoint.cfg)
    model.set_trainable(net, args.train_blocks, args.strict_freeze)
    shapes = {n: p.shape for n, p in net.named_parameters() if p.requires_grad}
    owner = owners(shapes, world)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pin = master_device.type == "cpu" and device.type == "cuda"
    masters = {}

    def stream():
        for key, tensor in checkpoint.tensors():
            if key in shapes and owner[key] == rank:
                masters[key] = tensor.to(master_device, torch.float32, copy=True)
                if pin:
                    masters[key] = masters[key].pin_memory()
            yield key, tensor.to(device, dtype)

    model.assign_weights(net, stream(), checkpoint.layout, device=device, dtype=None)
    model.set_trainable(net, args.train_blocks, args.strict_freeze)  # assignment made new Parameter objects
    net.gradient_checkpointing = args.grad_checkpointing
    return net.train(), masters, checkpoint


def save_checkpoint(out: Path, masters: MasterWeights, step: int, counters: dict, args, rank: int, world: int):
    """trained.safetensors (+ trained_ema), then every rank's train_state shard, and train_state.pt last: its step
    is the checkpoint's step, checked against the others on resume."""
    init = str(Path(args.init).resolve())
    meta = {"format": model.TRAINED_FORMAT, "init": init, "step": str(step)}
    sources = [("masters", out / "trained.safetensors")] + [("ema", out / "trained_ema.safetensors")] * (args.ema > 0)
    for source, path in sources:
        tensors = masters.gathered(source)
        if rank == 0:
            specs = {n: torch.empty(p.shape, dtype=torch.float32, device="meta") for n, p in masters.params.items()}
            model.write_safetensors(path, tensors, {**meta, "weights": source}, specs=specs)
        else:
            for _ in tensors:  # take part in the broadcasts
                pass
    shard = {"step": step, **masters.state_dict()}
    if rank > 0:
        atomic_torch_save(shard, out / f"train_state.rank{rank}.pt")
    barrier()
    if rank == 0:
        state = {**shard, "world": world, "counters": counters, "samples_seen": step * args.batch_size,
                 "settings": run_settings(args), "shards": [f"train_state.rank{r}.pt" for r in range(1, world)]}
        atomic_torch_save(state, out / "train_state.pt")
    barrier()


def run_settings(args) -> dict:
    """The settings that define a run's trajectory (paths absolute): a resumed run must use the same."""
    return {k: str(Path(getattr(args, k)).resolve()) if k in ("init", "data") else getattr(args, k)
            for k in RUN_DEFINING}


def atomic_torch_save(obj, path: Path):
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_train_state(out: Path, args) -> tuple[dict, list[dict]]:
    """train_state.pt and the shards of the other ranks, checked against trained.safetensors and these settings."""
    path = out / "train_state.pt"
    if not path.exists():
        raise SystemExit(f"--resume: {path} does not exist; start without --resume (or pass the run's --out)")
    state = torch.load(path, weights_only=True, map_location="cpu")
    now = run_settings(args)
    for key, value in state["settings"].items():
        if now[key] != value:
            raise SystemExit(f"--resume: --{key.replace('_', '-')} is {now[key]!r} but the run started with {value!r}; "
                             "resume with the run's settings, or start a new --out")
    shards = [state] + [torch.load(out / name, weights_only=True, map_location="cpu", mmap=True)
                        for name in state["shards"]]
    trained_step = model.safetensors_header(out / "trained.safetensors", metadata=True)[0].get("step")
    steps = {int(trained_step)} | {s["step"] for s in shards}
    if steps != {state["step"]}:
        raise SystemExit(f"--resume: the checkpoint files in {out} are from different steps {sorted(steps)} (a run "
                         "stopped while saving); restore a consistent set or start a new --out")
    return state, shards


class Log:
    """Rank 0's progress: a line on stdout and a JSON row in <out>/log.jsonl per event."""

    def __init__(self, out: Path, rank: int, resume_step: int | None):
        """resume_step None: a new run starts a new log. Else the rows past that step (steps of the interrupted run
        after its checkpoint, about to be redone) are dropped."""
        self.path, self.enabled = out / "log.jsonl", rank == 0
        if not self.enabled or not self.path.exists():
            return
        rows = [] if resume_step is None else [line for line in self.path.read_text().splitlines()
                                               if line and json.loads(line).get("step", 0) <= resume_step]
        tmp = self.path.with_name(".log.jsonl.tmp")
        tmp.write_text("".join(row + "\n" for row in rows))
        os.replace(tmp, self.path)

    def __call__(self, row: dict, text: str | None = None):
        if not self.enabled:
            return
        print(text or json.dumps(row), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # peak RSS of the process


@torch.no_grad()
def write_samples(net: model.ZImageDiT, prompts: list[tuple[str, Path]], negative: Path | None, args, step: int,
                  out: Path):
    """The fixed grid: the first prompts of the data, seeds 0, 1, ... -> <out>/samples/step_XXXXXX.png."""
    from PIL import Image

    net.eval()
    read = lambda path: dict(model.read_tensors([path]))["cap"][None]
    neg = {}
    if negative is not None:
        neg_cap = read(negative)
        neg = dict(neg_cap=neg_cap, neg_mask=torch.ones(neg_cap.shape[:2], dtype=torch.bool))
    images = []
    for seed, (_, features) in enumerate(prompts):  # one at a time: the peak stays that of a single image
        cap = read(features)
        images.append(model.generate(net, cap, torch.ones(cap.shape[:2], dtype=torch.bool), [seed], args.res,
                                     args.res, args.sample_steps, args.shift,
                                     guidance=args.sample_guidance if neg else 1.0, **neg)[0].cpu())
    net.train()
    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    grid = torch.ones(3, rows * args.res, columns * args.res)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * args.res:(r + 1) * args.res, c * args.res:(c + 1) * args.res] = image.clamp(-1, 1)
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = out / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def setup_distributed(args) -> tuple[int, int, torch.device]:
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun (or set by hand); NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if kind == "cuda" else kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def choose_micro_batch(plan_for, per_rank: int, device: torch.device) -> int:
    """The largest divisor of the per-process batch whose plan fits 90% of the GPU (all of it on CPU)."""
    if device.type != "cuda":
        return per_rank
    capacity = 0.9 * torch.cuda.get_device_properties(device).total_memory
    fitting = [m for m in range(per_rank, 0, -1) if per_rank % m == 0 and plan_for(m)["gpu_total"] <= capacity]
    return fitting[0] if fitting else 1


def main(argv=None):
    args = parse_args(argv)
    if args.plan_only:
        return print_plans(args)
    torch.set_flush_denormal(True)  # CPU: subnormal floats are many times slower (a toy training step: 1 s vs 0.2 s)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before the first CUDA allocation
    out = Path(args.out)
    rank, world, device = setup_distributed(args)
    try:
        train(args, out, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, out: Path, rank: int, world: int, device: torch.device):
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of the {world} processes")
    per_rank = args.batch_size // world
    if args.micro_batch is not None and (args.micro_batch < 1 or per_rank % args.micro_batch):
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide the per-process batch {per_rank} "
                         f"(--batch-size {args.batch_size} / {world} processes)")
    if (out / "train_state.pt").exists() and not args.resume:
        raise SystemExit(f"{out} already holds a run (train_state.pt); pass --resume to continue it or another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()

    init_cfg = l2p_config_of(args.init)
    if args.res % init_cfg.patch_size or args.res <= 0:
        raise SystemExit(f"--res {args.res} must be a positive multiple of the model's patch {init_cfg.patch_size}")
    try:
        counts = plan_counts(init_cfg, args.train_blocks, args.strict_freeze)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    records = find_records(Path(args.data))
    negative, caption_tokens = prepare_features(records, args, init_cfg, device, rank, world)

    elem = 2 if args.dtype == "bf16" else 4
    plan_for = lambda micro, low: memory_plan(init_cfg, counts, res=args.res, micro_batch=micro,
                                              caption_tokens=caption_tokens, elem=elem, low_memory=low, world=world,
                                              ema=args.ema > 0, checkpointing=args.grad_checkpointing)
    low_memory = args.low_memory
    if low_memory is None:
        low_memory = device.type == "cuda" and (
            torch.cuda.get_device_properties(device).total_memory < 40e9
            or plan_for(1, False)["gpu_total"] > 0.9 * torch.cuda.get_device_properties(device).total_memory)
    micro = args.micro_batch or choose_micro_batch(lambda m: plan_for(m, low_memory), per_rank, device)
    n_micro = per_rank // micro
    plan = plan_for(micro, low_memory)

    state, shards = load_train_state(out, args) if args.resume else (None, [])
    start = state["step"] if state else 0
    log = Log(out, rank, start if state else None)
    master_device = torch.device("cpu") if low_memory else device
    net, masters, checkpoint = load_for_training(out / "trained.safetensors" if state else Path(args.init), args,
                                                 device, master_device, rank, world)
    weights = MasterWeights(net, masters, args, master_device, rank, world)
    del masters
    if state:
        weights.load_state_dict(shards)
        del shards
    counters = dict(state["counters"]) if state else {"bad_steps": 0, "skipped_images": 0}

    log({"event": "plan", "plan": plan, "micro_batch": micro, "low_memory": low_memory, "world": world},
        format_plan(f"memory plan: {'low memory' if low_memory else 'standard'}, {world} process(es), micro-batch "
                    f"{micro} x {n_micro} accumulation = {per_rank} per process, global batch {args.batch_size}, "
                    f"{args.res}^2, captions up to {caption_tokens} tokens", plan))
    log({"event": "start", "step": start, "records": len(records), "trainable": counts["trainable"],
         "frozen": counts["frozen"], "layout": checkpoint.layout},
        f"{'resuming at' if state else 'starting at'} step {start} of {args.max_steps}: {len(records)} samples, "
        f"{counts['trainable']:,d} trainable / {counts['frozen']:,d} frozen params ({checkpoint.layout}), "
        f"device {device}")
    if args.head_lr_fan_in:
        scaled = {n: s for n in weights.params if (s := lr_scale(n, weights.params, args.head_lr_fan_in)) < 1}
        log({"event": "head_lr", "scales": scaled},
            f"--head-lr-fan-in {args.head_lr_fan_in}: {len(scaled)} head tensors learn at lr x "
            f"{min(scaled.values(), default=1):.3g}..{max(scaled.values(), default=1):.3g}")

    dataset = ImageCaptionDataset(records, args.res, args.seed, args.shift)
    sampler = StepSampler(len(records), args.batch_size, rank, world, args.seed, start, args.max_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, collate_fn=collate,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if args.workers else None)
    batches = iter(loader)
    prompts = [(r.caption, Path(r.features)) for r in records[:args.sample_count]]
    bad_images: dict[int, str] = {}
    bad_in_a_row, window, window_start = 0, [], time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    for step in range(start + 1, args.max_steps + 1):
        micro_batches = [next(batches) for _ in range(n_micro)]
        for mb in micro_batches:
            for index, error in mb["errors"]:
                if index not in bad_images:
                    bad_images[index] = error
                    print(f"[rank {rank}] skipped unreadable image {records[index].name}: {error} "
                          f"({len(bad_images)} distinct so far)", flush=True)
        valid = all_sum(sum(mb["weight"].sum() for mb in micro_batches).to(device)).item()
        counters["skipped_images"] += args.batch_size - int(valid)
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items() if isinstance(v, torch.Tensor)}
            per_sample = loss_fn(net, mb["image"], mb["noise"], mb["sigma"], mb["cap"], mb["cap_mask"])
            weighted = (per_sample * mb["weight"]).sum()
            (weighted / max(valid, 1)).backward()  # summed over ranks: the mean over the global batch
            weights.finish_backward()
            loss_sum += weighted.detach()
        loss = all_sum(loss_sum).item() / max(valid, 1)
        if valid and math.isfinite(loss):
            grad_norm = weights.step(lr_at(step, args), args.grad_clip)
        else:
            grad_norm = math.nan
            weights.discard()

        if math.isfinite(grad_norm):
            bad_in_a_row = 0
            window.append(loss)
        else:
            bad_in_a_row += 1
            counters["bad_steps"] += 1
            reason = "no readable image" if not valid else "non-finite loss" if not math.isfinite(loss) else \
                "non-finite gradient"
            log({"event": "skipped_step", "step": step, "loss": loss, "grad_norm": grad_norm, "reason": reason},
                f"step {step}: {reason} (loss {loss}, grad norm {grad_norm}); skipped, weights unchanged "
                f"({bad_in_a_row} in a row)")
            if bad_in_a_row >= args.max_bad_steps:
                save_checkpoint(out, weights, step, counters, args, rank, world)
                raise SystemExit(f"stopped at step {step}: {bad_in_a_row} steps in a row had a {reason} and were "
                                 f"skipped. The weights of the last good step are saved in {out} (resume with "
                                 "--resume); lower --lr or --grad-clip, or check the data")

        if window and (step % args.log_every == 0 or step == start + 1 or step == args.max_steps):
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "loss": sum(window) / len(window), "lr": lr_at(step, args),
                   "grad_norm": grad_norm, "images_per_s": len(window) * args.batch_size / elapsed,
                   "peak_mem_gib": peak_memory_gib(device), "bad_steps": counters["bad_steps"],
                   "skipped_images": counters["skipped_images"]}
            log(row, f"step {step:6d} | loss {row['loss']:.5f} | lr {row['lr']:.2e} | grad norm {grad_norm:.3f} | "
                     f"{row['images_per_s']:.2f} img/s | peak {row['peak_mem_gib']:.2f} GiB")
            window, window_start = [], time.perf_counter()
        if step % args.save_every == 0 or step == args.max_steps:
            save_checkpoint(out, weights, step, counters, args, rank, world)
        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps) and rank == 0:
            path = write_samples(net, prompts, negative, args, step, out)
            log({"event": "samples", "step": step, "path": str(path)}, f"samples: {path}")

    unreadable = bad_images
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, bad_images)
        unreadable = {i: e for part in parts for i, e in part.items()}
    names = [records[i].name for i in sorted(unreadable)]
    log({"event": "summary", "step": args.max_steps, "bad_steps": counters["bad_steps"],
         "skipped_images": counters["skipped_images"], "unreadable": names},
        f"done at step {args.max_steps}: {counters['bad_steps']} skipped steps, {counters['skipped_images']} image "
        f"reads skipped ({len(names)} unreadable files{': ' + ', '.join(names) if names else ''}); weights in "
        f"{out / 'trained.safetensors'}")


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Every file is written and the process group destroyed, yet gloo's worker threads can still abort the
        # interpreter's teardown (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291),
        # turning a finished run into a failed exit code. Leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
