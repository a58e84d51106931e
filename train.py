"""
Train the L2P pixel model: the shallow layers learn pixels while the frozen middle of the source DiT stays as is.

    python train.py --init l2p-init-1k.safetensors --data synth/ --out runs/l2p            # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py --init l2p-init-1k.safetensors --data synth/ --out runs/l2p
    python train.py ... --resume                                                           # continue a run exactly
    python train.py --plan-only                                                            # memory plan, real size

The objective is written out in the loop: x0 in [-1, 1], sigma one of 1000 shift-3 steps (FLUX.2: exp(mu), 7.56 at
1024^2), eps ~ N(0, I), x_sigma = (1 - sigma) x0 + sigma eps, fp32 MSE between v and eps - x0, each draw seeded by the
sample's global position (any number of processes or micro-batches gives the same run; --resume continues it exactly).
A lifted init trains its Detailer Head alone on the x0 error, on its sampler's states (--vae: x0's in-span part
replaced by the lift of its VAE latent, noised; noising x0 erodes it); the other recipes train shallow layers.

The network computes in --dtype (bf16 on CUDA, fp32 on the CPU); AdamW updates fp32 masters of the trained tensors
(model.set_trainable's policy), micro-batches accumulating in fp32 (MasterWeights; torch's default would in bf16),
under torchrun through DistributedDataParallel's bf16 buckets. Memory modes (--plan-only): standard (masters and AdamW
on the GPU; --zero shards AdamW's state over the processes) and low memory (masters and fused AdamW on the CPU, a chunk
at a time, gradients on the GPU in the weights' dtype: the real model fits a 24 GB card; the default under 40 GB).

Writes in --out: trained.safetensors (the trained tensors, read over their init by sample.py; `convert.py --src`
merges it), trained_ema.safetensors (--ema), train_state.pt (+ .rank<r>.pt under ZeRO), log.jsonl, samples/, features/.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--init", help="the L2P checkpoint to start from (convert.py output)")
    add("--data", help="a synth.py output, a folder of images with metadata.jsonl or .csv (file_name/image + "
                       "prompt/text/caption), or a folder of webdataset .tar shards")
    add("--out", help="run folder: checkpoints, train_state.pt, log.jsonl, samples/")
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint, exactly")
    add("--text-encoder", help="Z-Image repo root, its text_encoder/ or qwen_3_4b.safetensors: encodes captions "
                               "without cached features (once, into <out>/features/) and the samples' empty prompt")
    # the objective and the optimizer; defaults: the paper's recipe
    add("--max-steps", type=int, default=10_000, help="optimizer steps (unpublished; 10k = 4 epochs of 20k images)")
    add("--batch-size", type=int, default=8, help="global batch, over all processes")
    add("--micro-batch", type=int, help="samples per process per forward pass, gradients accumulating up to the "
                                        "batch (default: the largest the memory plan fits)")
    add("--lr", type=float, default=5e-5, help="AdamW learning rate (betas are torch's defaults)")
    add("--head-lr-fan-in", type=int, default=0, metavar="N",
        help="0 (the paper): one lr. N > 0: each Detailer Head conv of fan-in k > N learns at lr x N / k (muP's rule "
             "for Adam): at a high lr the deepest decoder conv can die and the head stop hearing the prompt")
    add("--weight-decay", type=float, default=0.01, help="AdamW weight decay, on every trained tensor")
    add("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off")
    add("--warmup", type=int, default=100, help="linear learning-rate warmup in steps, constant after")
    add("--ema", type=float, default=0.0, help="EMA decay of the trained weights, e.g. 0.9999 (0 = off, as released)")
    add("--shift", type=float, help="sigma shift s: sigma = s u / (1 + (s - 1) u); default the sampler's: 3 (a lift: "
                                    "its source's), FLUX.2's exp(mu) at --res; x patch / 16 for a lift")
    add("--seed", type=int, default=0, help="seeds the data order, sigma and noise, sample by sample")
    add("--train-blocks", type=int, default=5, help="n: the first and last n main layers train (the paper: 5)")
    add("--strict-freeze", action="store_true", help="only the patch embedder, first/last n layers and head train "
                                                     "(the paper's wording; default: the released code's policy)")
    add("--trainable", choices=["shallow", "head"], help="shallow: the freeze policy above (the paper); head: the "
        "Detailer Head alone, the DiT stays the source's (default: head for a lifted init, else shallow)")
    add("--loss", choices=["v", "x0"], help="v: MSE on v (the paper); x0: MSE on x0 = x_sigma - max(sigma, 0.05) v, "
        "so that high sigma, where the layout is decided, counts as much as low (default: x0 for an x0 init, else v)")
    add("--vae", help="the source's VAE (repo root, vae/ folder or file), for --states source: each image's part in "
                      "the lift's subspace replaced by the lift of its VAE latent (model.PixelLift.source_image)")
    add("--states", choices=["source", "image"], help="source: the lifted init's sampler states (needs --vae, --loss "
        "x0; its default); image: the images noised, x_sigma = (1 - sigma) x0 + sigma eps (the paper)")
    add("--res", type=int, default=1024, help="resolution: shorter side resized, centre crop; a multiple of the patch")
    # precision and memory
    add("--dtype", choices=["bf16", "fp32"], help="weights the network computes with (default: bf16 on CUDA, fp32 "
                                                  "on the CPU, where bf16 convolutions are many times slower)")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
        help="recompute each DiT block in the backward pass instead of keeping its activations")
    add("--compile", action="store_true", help="torch.compile the transformer blocks (the first steps compile)")
    add("--low-memory", action=argparse.BooleanOptionalAction, help="masters and AdamW on the CPU (default: on "
                                                                    "cards under 40 GB or when standard does not fit)")
    add("--zero", action=argparse.BooleanOptionalAction, help="under torchrun, shard AdamW's state with "
                                                              "ZeroRedundancyOptimizer (default: when needed)")
    add("--device", help="cuda or cpu (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    add("--workers", type=int, default=min(4, len(os.sched_getaffinity(0)) - 1),
        help="DataLoader worker processes per training process (default: up to 4, fewer than the cores)")
    add("--plan-only", action="store_true", help="print the memory plan of each mode and exit (no weights loaded)")
    add("--size", choices=["real", "flux2"], default="real", help="--plan-only, no --init: Z-Image's or klein's L2P")
    # logging, samples, checkpoints
    add("--log-every", type=int, default=10, help="print and append to log.jsonl every N steps")
    add("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    add("--sample-every", type=int, default=500, help="samples every N steps (0 = never): judge on them, not the loss")
    add("--sample-count", type=int, default=4, help="samples per grid: the first prompts of the data")
    add("--sample-steps", type=int, help="Euler steps per sample (default sample.py's: a lift's source's, else 30)")
    add("--sample-guidance", type=float, help="CFG c of the samples (default sample.py's: a lift's source's, else 2)")
    add("--max-bad-steps", type=int, default=5, help="steps skipped in a row before the run stops, saved")
    args = parser.parse_args(argv)
    model.check_finite(parser, args)
    for name, least in dict(max_steps=1, batch_size=1, micro_batch=1, res=1, log_every=1, save_every=1, sample_count=1,
                            sample_steps=1, max_bad_steps=1, head_lr_fan_in=0, warmup=0, sample_every=0, workers=0,
                            lr=0, weight_decay=0, grad_clip=0, ema=0).items():
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.ema >= 1 or (args.shift is not None and args.shift <= 0):
        parser.error("--ema must be below 1 and --shift positive")
    if not args.plan_only and None in (args.init, args.data, args.out):
        parser.error("--init, --data and --out are required (or --plan-only)")
    return args


RUN_DEFINING = ("seed", "batch_size", "res", "shift", "train_blocks", "strict_freeze", "trainable", "loss", "states",
                "dtype", "warmup", "weight_decay", "head_lr_fan_in")  # --lr, --grad-clip: the remedy after a stop
TRAIN_STEPS = 1000  # training sigmas: one of 1000 shifted steps, as the source was trained


def main(argv=None):
    args = parse_args(argv)
    if args.plan_only:
        return print_plans(args)
    torch.set_flush_denormal(True)  # CPU: arithmetic on subnormal floats is many times slower
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before the first CUDA allocation
    rank, world, device = model.init_distributed(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    try:
        train(args, Path(args.out), rank, world, device)
    finally:
        model.finish_distributed()


def train(args, out: Path, rank: int, world: int, device: torch.device):
    if (out / "train_state.pt").exists() and not args.resume:
        raise SystemExit(f"{out} already holds a run (train_state.pt); pass --resume to continue it or another --out")
    cfg = l2p_config_of(args.init)
    if args.res % cfg.patch_size:
        raise SystemExit(f"--res {args.res} must be a multiple of the model's patch {cfg.patch_size}")
    recipe_defaults(args, cfg)
    if args.states == "source" and not args.vae:
        raise SystemExit("--states source needs the source's VAE to make its states (a lifted init's default): pass "
                         "--vae <the source's repo, vae/ folder or file>, or --states image to noise the images")
    if args.shift is None:  # train on the sigmas the sampler uses at this size
        args.shift = model.pixel_shift(cfg, (args.res // cfg.patch_size) ** 2, (cfg.source_sampler or (50,))[0])
    vae = model.load_vae(args.vae, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                         family=cfg.family).eval() if args.states == "source" else None
    if vae is not None:
        model.check_vae_fits(vae, cfg.lift_dim, f"--vae {args.vae}")
    args.vae_weights = model.weights_sha256(vae) if vae is not None else None  # part of the run's identity
    out.mkdir(parents=True, exist_ok=True)
    records = model.find_records(Path(args.data))
    negative, caption_tokens = prepare_features(records, args, cfg, device, rank, world)
    plan, micro, low_memory, zero = choose_plan(args, cfg, caption_tokens, world, device)
    n_micro = args.batch_size // world // micro
    state, shards = load_train_state(out, args, records) if args.resume else (None, [])
    start, log = state["step"] if state else 0, Log(out, rank, state and state["step"])
    if start > args.max_steps:
        raise SystemExit(f"--resume: the run is at step {start}, past --max-steps {args.max_steps}; raise --max-steps")
    net, masters, layout = load_for_training(out / "trained.safetensors" if state else Path(args.init), args, device,
                                             torch.device("cpu") if low_memory else device)
    weights = MasterWeights(net, masters, args, hook=world == 1 and not low_memory, zero=zero)
    if state:
        weights.load_state(shards, out / "trained_ema.safetensors")
    del masters, shards
    ddp = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None, init_sync=False,
                                  gradient_as_bucket_view=True) if world > 1 else None
    counters = dict(state["counters"]) if state else {"bad_steps": 0, "skipped_images": 0}
    trainable = sum(p.numel() for p in weights.params.values())
    log({"event": "plan", "plan": plan, "micro_batch": micro, "low_memory": low_memory, "zero": zero, "world": world},
        model.format_plan(f"memory plan: {'low memory' if low_memory else 'standard'}{' + ZeRO' * zero}, {world} "
                          f"process(es), micro-batch {micro} x {n_micro} per process, global batch {args.batch_size}, "
                          f"{args.res}^2, captions up to {caption_tokens} tokens", plan))
    log({"event": "start", "step": start, "records": len(records), "trainable": trainable, "layout": layout,
         "device": str(device), "dtype": args.dtype, "shift": args.shift, "workers": args.workers,
         "head_lr_scales": weights.lr_scales}, f"{'resuming at' if state else 'starting at'} step {start} of "
        f"{args.max_steps}: {len(records)} samples, {trainable:,d} trainable params ({layout}), {device}, {args.dtype}"
        + (f", {len(weights.lr_scales)} head tensors at lr x {min(weights.lr_scales.values()):.3g}.."
           f"{max(weights.lr_scales.values()):.3g}" if weights.lr_scales else ""))

    order = sample_order(len(records), args.batch_size, rank, world, args.seed, start, args.max_steps)
    dataset = model.ImageCaptionDataset(records, args.res)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=order, collate_fn=model.collate,
                                               num_workers=args.workers, pin_memory=device.type == "cuda"))
    dtype, bad_images, bad_in_a_row, window, clock = next(net.parameters()).dtype, {}, 0, [], time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start + 1, args.max_steps + 1):
        micro_batches = [next(batches) for _ in range(n_micro)]
        for index, error in (e for mb in micro_batches for e in mb["errors"] if e[0] not in bad_images):
            bad_images[index] = error
            print(f"[rank {rank}] skipped unreadable image {records[index].name}: {error}", flush=True)
        valid = all_sum(sum(mb["weight"].sum() for mb in micro_batches).to(device)).item()
        counters["skipped_images"] += args.batch_size - int(valid)
        loss_sum = torch.zeros((), device=device)
        for i, mb in enumerate(micro_batches):
            x0, cap, cap_mask, weight = (mb[k].to(device, non_blocking=True) for k in ("image", "cap", "cap_mask",
                                                                                       "weight"))
            # The objective. u = k / 1000 with k uniform in 1..1000, sigma = s u / (1 + (s - 1) u); eps ~ N(0, I);
            # both drawn from the sample's global position alone.
            u = torch.tensor([torch.randint(1, TRAIN_STEPS + 1, (), generator=seeded(args.seed, "sigma", p)).item()
                              for p in mb["position"]], dtype=torch.float64) / TRAIN_STEPS
            sigma = model.shift_sigma(u, args.shift).float().to(device)
            eps = torch.stack([torch.randn(x0.shape[1:], device=device, generator=seeded(args.seed, "noise", p, device))
                               for p in mb["position"]])
            s = sigma.view(-1, 1, 1, 1)
            with torch.no_grad():
                start_image = x0 if vae is None else net.lift.source_image(x0, vae, cfg.patch_size)
            with ddp.no_sync() if ddp and i < n_micro - 1 else contextlib.nullcontext():
                x_sigma = (1 - s) * start_image + s * eps
                v = (ddp or net)(x_sigma.to(dtype), sigma, cap, cap_mask, span_detail=True).float()
                if args.loss == "x0":  # the error of the predicted x0 = x_sigma - max(sigma, 0.05) v
                    error = x_sigma - sigma.clamp_min(model.X0_MIN_SIGMA).view(-1, 1, 1, 1) * v - x0
                else:
                    error = v - (eps - x0)
                per_sample = error.square().mean(dim=(1, 2, 3)) * weight
                # the mean over the global batch's readable images (DDP averages the ranks' gradients)
                (per_sample.sum() * world / max(valid, 1)).backward()
            loss_sum += per_sample.sum().detach()
        loss = all_sum(loss_sum).item() / max(valid, 1)
        grad_norm = weights.step(lr_at(step, args), args.grad_clip) if valid and math.isfinite(loss) else math.nan

        if math.isfinite(grad_norm):
            bad_in_a_row, window = 0, window + [loss]
        else:  # skipped: the weights stay as they were
            weights.discard()
            bad_in_a_row, counters["bad_steps"] = bad_in_a_row + 1, counters["bad_steps"] + 1
            reason = ("no readable image" if not valid else "non-finite loss" if not math.isfinite(loss) else
                      "non-finite gradient")
            log({"event": "skipped_step", "step": step, "loss": loss, "grad_norm": grad_norm, "reason": reason},
                f"step {step}: {reason} (loss {loss}, grad norm {grad_norm}); skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= args.max_bad_steps:
                save_checkpoint(out, weights, step, counters, args, records, rank, world)
                raise SystemExit(f"stopped at step {step}: {bad_in_a_row} steps in a row had a {reason} and were "
                                 f"skipped. The last good weights are saved in {out} (--resume continues); "
                                 + ("check the data" if not valid else "lower --lr or --grad-clip, or check the data"))
        if window and (step % args.log_every == 0 or step in (start + 1, args.max_steps)):
            seconds, clock = time.perf_counter() - clock, time.perf_counter()
            row = {"step": step, "loss": sum(window) / len(window), "lr": lr_at(step, args), "grad_norm": grad_norm,
                   "images_per_s": len(window) * args.batch_size / seconds, "step_s": seconds / len(window),
                   "peak_mem_gib": model.peak_memory_gib(device), **counters}
            log(row, f"step {step:6d} | loss {row['loss']:.5f} | lr {row['lr']:.2e} | grad norm {grad_norm:.3f} | "
                     f"{row['images_per_s']:.2f} img/s | peak {row['peak_mem_gib']:.2f} GiB")
            window = []
        if step % args.save_every == 0 or step == args.max_steps:
            save_checkpoint(out, weights, step, counters, args, records, rank, world)
        if rank == 0 and args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
            path = write_samples(net, [r.features for r in records[:args.sample_count]], negative, args, step, out)
            log({"event": "samples", "step": step, "path": str(path)}, f"samples: {path}")

    everyone = [bad_images] * world
    if world > 1:
        dist.all_gather_object(everyone, bad_images)
    names = sorted({records[i].name for part in everyone for i in part})
    log({"event": "summary", "step": args.max_steps, **counters, "unreadable": names},
        f"done at step {args.max_steps}: {counters['bad_steps']} skipped steps, {counters['skipped_images']} image "
        f"reads skipped ({len(names)} unreadable files{': ' + ', '.join(names) if names else ''}); weights in "
        f"{out / 'trained.safetensors'}")
    if counters["bad_steps"] == args.max_steps:
        raise SystemExit(f"no step trained: all {args.max_steps} were skipped; check --data (see the lines above)")


def lr_at(step: int, args) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then constant."""
    return args.lr * min(1.0, step / max(1, args.warmup))


def seeded(seed: int, stream: str, position: int, device="cpu") -> torch.Generator:
    """A generator for one draw (stream 'noise' of sample 1234, ...) from the run seed alone: counter-based, so any
    rank, worker or resumed run draws the same numbers for the same sample."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{position}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Data order and caption features (the readers are model.py's, section 9)
# ----------------------------------------------------------------------------------------------------------------

def sample_order(n_records: int, batch_size: int, rank: int, world: int, seed: int, start: int, end: int):
    """(record index, global position) for this rank, steps `start` to `end`. The global stream of positions is cut
    into steps of batch_size and rank r takes the r-th slice of each; record indices follow one seeded permutation
    per epoch, so the order depends on the seed alone."""
    per_rank, epoch, order = batch_size // world, -1, None
    for step in range(start, end):
        for position in range(step * batch_size + rank * per_rank, step * batch_size + (rank + 1) * per_rank):
            if position // n_records != epoch:
                epoch = position // n_records
                order = torch.randperm(n_records, generator=seeded(seed, "epoch", epoch)).tolist()
            yield order[position % n_records], position


def prepare_features(records: list[model.Record], args, cfg: model.ZImageConfig, device, rank: int, world: int
                     ) -> tuple[Path | None, int]:
    """Give every record a caption-feature file: synth.py's cached ones, else <out>/features/ encoded once by
    --text-encoder (shared out over the ranks; the encoder is freed before the DiT loads). Returns the empty
    prompt's file (CFG samples; None when unavailable) and the longest caption in tokens."""
    cache = Path(args.out) / "features"
    wants_negative = args.sample_every > 0 and args.sample_guidance != 1
    captions = sorted({r.caption for r in records if r.features is None} | ({""} if wants_negative else set()))
    todo = [c for c in captions if not model.caption_features_path(cache, c).exists()]
    if todo and args.text_encoder is not None:
        model.check_text_encoder(args.text_encoder, cfg)
        if rank == 0:
            print(f"text encoder: encoding {len(todo)} captions with {args.text_encoder} into {cache}")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if todo[rank::world]:
            model.encode_to_cache(args.text_encoder, todo[rank::world], cache, device, dtype, family=cfg.family)
        barrier()  # every rank's captions are on disk before any rank reads them
    for r in records:
        r.features = r.features or str(model.caption_features_path(cache, r.caption))
    missing = [r for r in records if not Path(r.features).exists()]
    if missing:
        raise SystemExit(f"{len(missing)} of {len(records)} samples have no cached text features (first caption: "
                         f"{missing[0].caption[:60]!r}); pass --text-encoder <the source repo> to encode them")
    shapes = {path: model.safetensors_shapes([Path(path)]).get("cap") for path in sorted({r.features for r in records})}
    for path, shape in shapes.items():
        if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] != cfg.cap_feat_dim:
            raise SystemExit(f"caption features {path}: expected a tensor 'cap' [L >= 1, {cfg.cap_feat_dim}] (the "
                             f"text encoder's rows for this model), found {shape}")
    negative = model.caption_features_path(cache, "")
    if wants_negative and not negative.exists() and rank == 0:
        print("samples: no features of the empty prompt (pass --text-encoder once), so samples are unguided")
    return (negative if wants_negative and negative.exists() else None), max(s[0] for s in shapes.values())


# ----------------------------------------------------------------------------------------------------------------
# Trained weights: fp32 masters, AdamW (or ZeRO), EMA
# ----------------------------------------------------------------------------------------------------------------

class MasterWeights:
    """fp32 masters of the trained tensors, their AdamW (or ZeRO) and EMA. With `hook` (one process, standard mode)
    each gradient goes into its master's fp32 .grad as it is formed; otherwise the weights' own .grad (DDP's buckets
    under torchrun) holds it until step() converts it, a chunk of tensors at a time (under ZeRO: the own shard)."""

    def __init__(self, net: model.ZImageDiT, masters: dict[str, torch.Tensor], args, hook: bool, zero: bool):
        self.params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        self.masters, self.hook, self.ema_decay = masters, hook, args.ema
        self.lr_scales = {n: s for n in self.params if (s := lr_scale(n, self.params, args.head_lr_fan_in)) < 1}
        scales = sorted(set(self.lr_scales.values()) | {1.0})
        groups = [{"params": [m for n, m in masters.items() if self.lr_scales.get(n, 1.0) == s], "lr_scale": s}
                  for s in scales]
        adamw = dict(lr=args.lr, weight_decay=args.weight_decay, fused=True)
        self.optimizer = ZeroRedundancyOptimizer(groups, torch.optim.AdamW, **adamw) if zero else \
            torch.optim.AdamW(groups, **adamw)
        self.local = self.optimizer.optim if zero else self.optimizer  # the optimizer of the tensors this rank steps
        own = [n for n, m in masters.items() if any(m is q for g in self.local.param_groups for q in g["params"])]
        self.chunks = [own]
        if not (hook or zero):  # .grad becomes fp32 a chunk at a time: all at once would not fit beside the weights
            self.chunks, size = [[]], 0
            for name in own:
                if self.chunks[-1] and size + self.params[name].numel() > model.CHUNK_ELEMENTS:
                    self.chunks, size = self.chunks + [[]], 0
                self.chunks[-1].append(name)
                size += self.params[name].numel()
        self.chunks = [c for c in self.chunks if c]
        self.ema = {n: m.clone() for n, m in masters.items()} if args.ema else {}
        if hook:
            for name, p in self.params.items():
                masters[name].grad = torch.zeros_like(masters[name])
                p.register_post_accumulate_grad_hook(self._accumulate(name))

    def _accumulate(self, name: str):
        def take_gradient(p):
            self.masters[name].grad.add_(p.grad)
            p.grad = None
        return take_gradient

    def gradients(self) -> list[torch.Tensor]:
        if self.hook:
            return [m.grad for m in self.masters.values()]
        return [p.grad for p in self.params.values() if p.grad is not None]

    def discard(self):
        """Drop the step's gradients (a skipped step)."""
        torch._foreach_zero_(self.gradients())

    @torch.no_grad()
    def step(self, lr: float, grad_clip: float) -> float:
        """Clip and apply the step's gradients; returns the global gradient norm (no update if it is not finite)."""
        grads = self.gradients()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                     for g in grads])).item()
        if not math.isfinite(norm):
            return norm
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for chunk in self.chunks:
            if not self.hook:
                for name in chunk:
                    self.masters[name].grad = self.params[name].grad.to(self.masters[name].device).float()
            if 0 < grad_clip < norm:
                torch._foreach_mul_([self.masters[n].grad for n in chunk], grad_clip / (norm + 1e-6))
            self.optimizer.step()  # steps the tensors that have a .grad: this chunk (ZeRO: its shard, then syncs all)
            if not self.hook:
                for name in chunk:
                    self.masters[name].grad = None
        torch._foreach_zero_(grads)
        if self.ema:
            torch._foreach_lerp_(list(self.ema.values()), [self.masters[n] for n in self.ema], 1 - self.ema_decay)
        for name, p in self.params.items():
            p.copy_(self.masters[name], non_blocking=True)
        return norm

    def state(self) -> dict[str, dict]:
        """AdamW's state of the tensors this rank steps, by name (a run can resume on another number of ranks)."""
        return {n: {k: v.cpu() for k, v in self.local.state[self.masters[n]].items()} for c in self.chunks for n in c}

    def load_state(self, shards: list[dict], ema: Path):
        states = {n: s for shard in shards for n, s in shard["adamw"].items()}
        for name in (n for chunk in self.chunks for n in chunk):
            if name not in states:
                raise SystemExit(f"--resume: the optimizer state lacks {name}; restore the run's train_state files")
            self.local.state[self.masters[name]] = {k: v.to(self.masters[name].device) for k, v in states[name].items()}
        if self.ema and not ema.exists():
            raise SystemExit("--resume: the run has no trained_ema.safetensors; resume with the --ema it started with")
        if self.ema:
            for name, tensor in model.read_tensors([ema]):
                self.ema[name].copy_(tensor)


def lr_scale(name: str, params: dict[str, torch.Tensor], head_fan_in: int) -> float:
    """min(1, N / fan-in) for the Detailer Head's convolutions (a bias takes its weight's) under --head-lr-fan-in N."""
    if not head_fan_in or not name.startswith("local_decoder."):
        return 1.0
    weight = params[name.removesuffix(".bias") + ".weight" if name.endswith(".bias") else name]
    return min(1.0, head_fan_in / math.prod(weight.shape[1:]))


def recipe_defaults(args, cfg: "model.ZImageConfig | model.Flux2Config"):
    """--trainable, --loss and --states where not given: what the init's recipe trains with (see --help); the sample
    grids' sampler, sample.py's. The combinations that cannot train are refused here, for training and --plan-only."""
    args.trainable = args.trainable or ("head" if cfg.lift_dim else "shallow")
    args.loss = args.loss or ("x0" if cfg.x_prediction else "v")
    args.states = args.states or ("source" if cfg.lift_dim else "image")
    steps, guidance, shift = model.pixel_sampler(cfg, (args.res // cfg.patch_size) ** 2, args.sample_steps)
    args.sample_steps, args.sample_shift = steps, args.shift or shift  # the samples: sample.py's defaults
    args.sample_guidance = guidance if args.sample_guidance is None else args.sample_guidance
    if args.states == "source" and not (cfg.lift_dim and args.loss == "x0"):
        raise SystemExit(f"--states source needs a lifted init (convert.py --recipe lift) and --loss x0; got "
                         f"{'a lifted' if cfg.lift_dim else 'an unlifted'} init and --loss {args.loss}. Pass them, or "
                         "--states image to noise the images themselves")
    if args.vae and args.states == "image":
        raise SystemExit("--vae is read only with --states source (a lifted init's sampler states); with --states "
                         "image the images are noised as they are: drop --vae")


def l2p_config_of(path) -> model.ZImageConfig:
    """The config of an L2P checkpoint (headers only); a latent Z-Image checkpoint is refused."""
    cfg = model.open_checkpoint(path).cfg
    if not cfg.pixel_head:
        raise SystemExit(f"--init {path} is a latent source checkpoint; make the L2P init with "
                         "`python convert.py --src <Z-Image> --out l2p-init.safetensors` first")
    return cfg


def load_for_training(path: Path, args, device: torch.device, master_device: torch.device):
    """The network (every weight in the compute dtype on `device`) and fp32 masters of its trained tensors (on
    master_device). Tensors stream from the file one at a time: frozen ones never exist in fp32."""
    checkpoint = model.open_checkpoint(path, init=args.init)
    with torch.device("meta"):
        net = model.new_model(checkpoint.cfg)
    freeze(net, args)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    dtype, masters = torch.bfloat16 if args.dtype == "bf16" else torch.float32, {}

    def stream():
        for key, tensor in checkpoint.tensors():
            if key in trained:
                masters[key] = tensor.to(master_device, torch.float32, copy=True)
            yield key, tensor

    model.assign_weights(net, stream(), checkpoint.layout, device=device, dtype=dtype)
    freeze(net, args)  # assignment made new Parameter objects
    net.gradient_checkpointing = args.grad_checkpointing
    if args.compile:
        model.compile_blocks(net)
    return net.train(), masters, checkpoint.layout


# ----------------------------------------------------------------------------------------------------------------
# Memory plan (model.py, section 10): the mode from the flags, or the one that fits
# ----------------------------------------------------------------------------------------------------------------


def freeze(net: "model.ZImageDiT | model.Flux2DiT", args) -> tuple[int, int]:
    """model.set_trainable with the flags: (trainable, frozen) parameter counts."""
    return model.set_trainable(net, args.train_blocks, args.strict_freeze, args.trainable == "head")


def plan_sizes(args, caption_tokens: int, family: str) -> dict:
    """memory_plan's sizes; with --states source the source's VAE, from its headers (--plan-only: the family's)."""
    vae = None
    if args.states == "source":
        _, _, vae_class, vae_config, _ = model.VAE_FORMATS[family]
        with torch.device("meta"):
            vae = model.load_vae(args.vae, "meta", family=family) if args.vae else vae_class(vae_config())
    return dict(res=args.res, caption_tokens=caption_tokens, elem=4 if args.dtype == "fp32" else 2, ema=args.ema > 0,
                checkpointing=args.grad_checkpointing, vae=vae)


def choose_plan(args, cfg: model.ZImageConfig, caption_tokens: int, world: int, device: torch.device):
    """(plan, micro-batch, low memory, ZeRO): the flags where given, else what the plan fits into 90% of the GPU."""
    per_rank = args.batch_size // world
    if args.batch_size % world or (args.micro_batch and per_rank % args.micro_batch):
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes, and "
                         f"--micro-batch {args.micro_batch} must divide the per-process batch {per_rank}")
    try:
        counts = model.trainable_counts(cfg, args.train_blocks, args.strict_freeze, args.trainable == "head")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    capacity = 0.9 * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else math.inf
    return model.choose_memory_mode(cfg, counts, per_rank=per_rank, micro_batch=args.micro_batch,
                                    low_memory=args.low_memory, zero=args.zero, world=world, capacity=capacity,
                                    **plan_sizes(args, caption_tokens, cfg.family))


def print_plans(args):
    """--plan-only: the plan of each mode for the real-size L2P (or --init's size), without loading weights."""
    source = model.Flux2Config() if args.size == "flux2" else model.ZImageConfig()
    cfg = l2p_config_of(args.init) if args.init else model.l2p_config(source, 16)
    recipe_defaults(args, cfg)
    counts = model.trainable_counts(cfg, args.train_blocks, args.strict_freeze, args.trainable == "head")
    trains = "--trainable head" if args.trainable == "head" else \
        f"--train-blocks {args.train_blocks}{', strict' if args.strict_freeze else ''}"
    print(f"L2P of {type(cfg).__name__.removesuffix('Config')}, p={cfg.patch_size}, dim={cfg.dim}: "
          f"{counts['trainable'] + counts['frozen']:,d} params, {counts['trainable']:,d} trainable ({trains}), "
          f"{args.res}^2, captions of 512 tokens (the maximum), {args.dtype or 'bf16'}, gradient checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}")
    modes = [("standard, micro-batch 1, 8 GPUs (the paper's setup)", False, 8, False),
             ("standard + ZeRO, micro-batch 1, 8 GPUs", False, 8, True),
             ("standard, micro-batch 1, 1 GPU (batch 8 by accumulation)", False, 1, False),
             ("low memory, micro-batch 1, 1 GPU (24 GB card)", True, 1, False)]
    for title, low, world, zero in modes:
        print(model.format_plan(title, model.memory_plan(cfg, counts, micro_batch=1, low_memory=low, world=world,
                                                         zero=zero, **plan_sizes(args, 512, cfg.family))))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, resume, log, samples
# ----------------------------------------------------------------------------------------------------------------


def run_settings(args, records: list[model.Record]) -> dict:
    """What defines a run's trajectory; the init, the data and the VAE by content: a moved run folder still resumes."""
    data = hashlib.sha256(json.dumps([(r.name, r.caption) for r in records]).encode()).hexdigest()
    return {"init": model.header_sha256(Path(args.init)), "data": data, "vae": args.vae_weights,
            **{k: getattr(args, k) for k in RUN_DEFINING}}


def save_checkpoint(out: Path, weights: MasterWeights, step: int, counters: dict, args, records, rank: int, world: int):
    """trained.safetensors (+ trained_ema), every rank's AdamW shard (ZeRO), then train_state.pt last: its step is
    the checkpoint's, checked against the others on resume."""
    meta = {**model.trained_metadata(Path(args.init), out / "trained.safetensors"), "step": str(step)}
    if rank == 0:
        for name, tensors in [("trained", weights.masters)] + [("trained_ema", weights.ema)] * bool(weights.ema):
            specs = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in tensors.items()}
            model.write_safetensors(out / f"{name}.safetensors", ((n, t.cpu()) for n, t in tensors.items()), meta,
                                    specs=specs)
    zero = isinstance(weights.optimizer, ZeroRedundancyOptimizer)
    if zero and rank > 0:
        model.atomic_write(out / f"train_state.rank{rank}.pt", lambda f: torch.save(
            {"step": step, "adamw": weights.state()}, f))
    barrier()
    if rank == 0:
        state = {"step": step, "adamw": weights.state(), "world": world, "counters": counters,
                 "samples_seen": step * args.batch_size, "settings": run_settings(args, records),
                 "shards": [f"train_state.rank{r}.pt" for r in range(1, world)] if zero else []}
        model.atomic_write(out / "train_state.pt", lambda f: torch.save(state, f))
    barrier()


def load_train_state(out: Path, args, records) -> tuple[dict, list[dict]]:
    """train_state.pt and the other ranks' shards, checked against trained.safetensors and these settings."""
    path = out / "train_state.pt"
    if not path.exists():
        raise SystemExit(f"--resume: {path} does not exist; start without --resume (or pass the run's --out)")
    try:  # a damaged file raises anything from the zip reader to the unpickler
        state = torch.load(path, weights_only=True, map_location="cpu")
        shards = [state] + [torch.load(out / n, weights_only=True, map_location="cpu", mmap=True)
                            for n in state["shards"]]
    except Exception as e:
        raise SystemExit(f"--resume: {path} (or a shard beside it) cannot be read ({type(e).__name__}: {e}); restore "
                         "the run's files or start a new --out") from None
    now = run_settings(args, records)
    for key, value in state["settings"].items():
        if now[key] != value:
            what = {"init": "not the checkpoint the run started from", "data": "not the data the run started with",
                    "vae": "not the VAE the run started with"}
            raise SystemExit(f"--resume: --{key.replace('_', '-')} " + what.get(key, f"is {now[key]!r} but the run "
                             f"started with {value!r}") + "; resume with the run's settings, or start a new --out")
    trained_step = model.safetensors_metadata(out / "trained.safetensors").get("step")
    if {int(trained_step)} | {s["step"] for s in shards} != {state["step"]}:
        raise SystemExit(f"--resume: the checkpoint files in {out} are from different steps (a run stopped while "
                         "saving); restore a consistent set or start a new --out")
    return state, shards


class Log:
    """Rank 0's progress: a line on stdout and a JSON row in <out>/log.jsonl per event."""

    def __init__(self, out: Path, rank: int, resume_step: int | None):
        """A new run starts a new log; a resumed one drops the rows past its checkpoint (steps about to be redone)."""
        self.path, self.enabled = out / "log.jsonl", rank == 0
        if self.enabled and self.path.exists():
            rows = [] if resume_step is None else [line for line in self.path.read_text().splitlines()
                                                   if line and json.loads(line).get("step", 0) <= resume_step]
            model.atomic_write(self.path, "".join(row + "\n" for row in rows).encode())

    def __call__(self, row: dict, text: str | None = None):
        if self.enabled:
            print(text or json.dumps(row), flush=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


@torch.no_grad()
def write_samples(net: model.ZImageDiT, prompts: list[str], negative: Path | None, args, step: int, out: Path) -> Path:
    """The fixed grid: the first prompts of the data, seeds 0, 1, ... -> <out>/samples/step_XXXXXX.png."""
    neg = {}
    if negative is not None:
        neg_cap = model.read_caption_features(negative)[None]
        neg = dict(guidance=args.sample_guidance, neg_cap=neg_cap, neg_mask=torch.ones(neg_cap.shape[:2], dtype=bool))
    net.eval()
    images = []
    for seed, features in enumerate(prompts):  # one at a time: the peak stays that of a single image
        cap = model.read_caption_features(Path(features))[None]
        mask = torch.ones(cap.shape[:2], dtype=torch.bool)
        images.append(model.to_uint8(model.generate(net, cap, mask, [seed], args.res, args.res, args.sample_steps,
                                                    args.sample_shift, **neg))[0])
    net.train()
    path = out / "samples" / f"step_{step:06d}.png"
    model.save_png(path, model.image_grid(images, columns=4))
    return path


if __name__ == "__main__":
    model.run_script(main)
