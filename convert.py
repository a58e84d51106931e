"""
Turn a latent source (Z-Image, or FLUX.2 [klein]) into the L2P pixel model's initial checkpoint.

    python convert.py --src Z-Image-Turbo/ --out l2p-init-1k.safetensors              # 1K: 16x16 RGB patches
    python convert.py --src Z-Image/ --out l2p-init-4k.safetensors --patch 64         # native 4K
    python convert.py --src FLUX.2-klein-base-4B/ --out l2p-klein-init-1k.safetensors # the MMDiT source
    python convert.py --src runs/l2p/trained.safetensors --out l2p-1k.safetensors     # merge init + trained

Every source tensor whose name and shape fit the pixel model is copied bit for bit (blocks, refiners, timestep and
caption embedders, modulations, pad tokens); the latent patch embedder and the output layer are dropped; the new
RGB patch embedder (Z-Image: all_x_embedder.{p}-1, as the released L2P files; FLUX.2: pixel_embedder, without bias
like every FLUX.2 layer) and the Detailer Head local_decoder are initialised from --seed. Tensors stream from the
source to the output one at a time, so a 24 GB checkpoint converts on a machine with less memory than that.

Given a train.py checkpoint (only the trained tensors + the path of their init), it writes instead the merged full
checkpoint (for Z-Image in the released L2P layout, which other L2P code can load).
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

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
    parser.add_argument("--seed", type=int, default=0, help="seed of the new patch embedder and head")
    parser.add_argument("--tail-modulation", type=int, default=0, metavar="N",
                        help="FLUX.2: give the last N single-stream blocks a private copy of the shared single-stream "
                             "modulation (initialised from it), so that they can train it while the frozen blocks "
                             "keep the source's; N = train.py's --train-blocks (default 0: none)")
    parser.add_argument("--dtype", choices=["keep", "bf16", "fp32"], default="keep",
                        help="keep: copied tensors keep the source dtype (bit-identical), new ones are fp32; "
                             "bf16 / fp32: cast everything (bf16 halves the file)")
    args = parser.parse_args(argv)
    if args.patch not in (16, 32, 64, 128):
        parser.error(f"--patch {args.patch}: the Detailer Head needs 16, 32, 64 or 128 (one pooling level per "
                     "factor 2 down to the token grid)")
    if args.head_width < 8 or args.head_width % 8:
        parser.error(f"--head-width {args.head_width}: use a positive multiple of 8")
    return args


def new_tensors(cfg, seed: int) -> dict[str, torch.Tensor]:
    """The parts of the pixel model that the latent source does not have, freshly initialised (PyTorch's default
    Linear; the head as DetailerHead.reset_parameters)."""
    torch.manual_seed(seed)
    p, flux2 = cfg.patch_size, isinstance(cfg, model.Flux2Config)
    embedder = torch.nn.Linear(p * p * cfg.in_channels, cfg.dim, bias=not flux2)
    head = model.DetailerHead(cfg.in_channels, cfg.dim, p, cfg.head_width)
    name = "pixel_embedder" if flux2 else f"all_x_embedder.{p}-1"
    tensors = {f"{name}.{k}": v for k, v in embedder.state_dict().items()}
    tensors.update({f"local_decoder.{k}": v for k, v in head.state_dict().items()})
    return tensors


def count(specs) -> int:
    return sum(t.numel() for t in specs.values())


def merge(source: model.DiTCheckpoint, out: Path, cast: torch.dtype | None, args):
    """init + trained tensors -> one full checkpoint in the released layout."""
    convert = lambda t: t.to(cast) if cast is not None and t.is_floating_point() else t
    specs = {k: convert(t) for k, t in source.tensors(meta=True)}
    metadata = {"format": "l2p", "l2p_patch": str(source.cfg.patch_size), "merged_from": str(args.src),
                "dtype": args.dtype, "written_by": "convert.py"}
    model.write_safetensors(out, ((k, convert(t)) for k, t in source.tensors()), metadata, specs=specs)
    trained = len(model.safetensors_shapes([source.trained]))
    print(f"merged  {source.layout}: {len(specs)} tensors ({trained} trained), {count(specs):,d} params -> {out} "
          f"({out.stat().st_size / 1e9:.2f} GB)")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise SystemExit(f"--out {out}: write a .safetensors file")
    source = model.open_checkpoint(args.src, args.init)
    cast = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if source.trained is not None:
        return merge(source, out, cast, args)
    if source.cfg.pixel_head:
        raise SystemExit(f"--src {args.src} is already an L2P pixel model ({source.layout}); pass a latent source")
    flux2 = isinstance(source.cfg, model.Flux2Config)
    if args.tail_modulation and not (flux2 and 0 < args.tail_modulation < source.cfg.num_single_layers):
        raise SystemExit(f"--tail-modulation {args.tail_modulation}: a FLUX.2 source and fewer than its "
                         "single-stream blocks")
    target_cfg = model.l2p_config(source.cfg, args.patch, args.head_width)
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
    created = new_tensors(target_cfg, args.seed)
    created = {k: v.to(cast or torch.float32) for k, v in created.items()}
    missing = [k for k in target if k not in copied and k not in created and k not in aliases]
    if missing:
        raise SystemExit(f"--src {args.src} ({source.layout}) lacks {len(missing)} tensors the pixel model needs "
                         f"(first: {missing[:5]}); is it a complete transformer?")

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
    start = time.time()
    model.write_safetensors(out, stream(), metadata, specs=specs)

    embedder = next(k for k in created if not k.startswith("local_decoder.")).rsplit(".", 1)[0]
    print(f"source  {args.src} ({source.layout}): {len(copied) + len(dropped)} tensors")
    print(f"copied  {len(copied):4d} tensors {count(copied):>15,d} params  (bit-identical"
          f"{'' if cast is None else ', cast to ' + args.dtype})" + (f", and {', '.join(aliases)} from "
                                                                      "single_stream_modulation" if aliases else ""))
    print(f"created {len(created):4d} tensors {count(created):>15,d} params  "
          f"({embedder} [{target_cfg.dim}, {args.patch ** 2 * 3}], local_decoder)")
    print(f"dropped {len(dropped):4d} tensors {count(dropped):>15,d} params  ({', '.join(dropped)})")
    print(f"wrote   {out}: {len(specs)} tensors, {count(specs):,d} params, {out.stat().st_size / 1e9:.2f} GB "
          f"in {time.time() - start:.0f} s")
    with torch.device("meta"):
        net = model.new_model(target_cfg)
    blocks = min(5, (target_cfg.num_layers + target_cfg.num_single_layers if flux2 else target_cfg.n_layers) // 2)
    trainable, frozen = model.set_trainable(net, train_blocks=blocks)
    print(f"freeze policy --train-blocks {blocks}: {trainable:,d} trainable, {frozen:,d} frozen parameters")


if __name__ == "__main__":
    model.run_script(main)
