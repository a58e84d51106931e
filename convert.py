"""
Turn a Z-Image checkpoint into the L2P pixel model's initial checkpoint, in the released L2P layout.

    python convert.py --src Z-Image-Turbo/ --out l2p-init-1k.safetensors              # 1K: 16x16 RGB patches
    python convert.py --src Z-Image/ --out l2p-init-4k.safetensors --patch 64         # native 4K
    python convert.py --src runs/l2p/trained.safetensors --out l2p-1k.safetensors     # merge init + trained

Every source tensor whose name and shape fit the pixel model is copied bit for bit (blocks, refiners, timestep and
caption embedders, pad tokens); the latent patch embedder and the final layer are dropped; the new RGB patch
embedder all_x_embedder.{p}-1 and the Detailer Head local_decoder are initialised from --seed. Tensors stream from
the source to the output one at a time, so a 24 GB checkpoint converts on a machine with less memory than that.

Given a train.py checkpoint (only the trained tensors + the path of their init), it writes instead the merged full
checkpoint in the released L2P layout, which other L2P code can load.
"""

import argparse
import time
from pathlib import Path

import torch

import model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True,
                        help="the Z-Image source: a repo root, its transformer/ folder, or a single .safetensors file; "
                             "or a train.py checkpoint to merge with its init")
    parser.add_argument("--out", required=True, help="the L2P checkpoint to write (.safetensors, one file)")
    parser.add_argument("--init", help="merging a train.py checkpoint whose init is no longer where the run recorded "
                                       "it: the convert.py output the run started from")
    parser.add_argument("--patch", type=int, default=16,
                        help="pixel patch: 16 keeps the source's token grid at 1024^2 (8x VAE x 2x2 latent patch); "
                             "64 keeps it at 4096^2; 32 and 128 follow the same rule")
    parser.add_argument("--head-width", type=int, default=64,
                        help="Detailer Head channels at half resolution (64 = the released heads; less for toy models)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new patch embedder and head")
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


def new_tensors(cfg: model.ZImageConfig, seed: int) -> dict[str, torch.Tensor]:
    """The parts of the pixel model that the latent source does not have, freshly initialised (PyTorch defaults)."""
    torch.manual_seed(seed)
    p = cfg.patch_size
    embedder = torch.nn.Linear(p * p * cfg.in_channels, cfg.dim)
    head = model.DetailerHead(cfg.in_channels, cfg.dim, p, cfg.head_width)
    tensors = {f"all_x_embedder.{p}-1.{k}": v for k, v in embedder.state_dict().items()}
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
    if model.detect_family(args.src, args.init) == "flux2":
        raise SystemExit(f"--src {args.src} is a FLUX.2 transformer: its L2P conversion is not built yet; convert a "
                         "Z-Image source (repo root, transformer/ folder or single file)")
    source = model.open_dit_checkpoint(args.src, args.init)
    cast = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if source.trained is not None:
        return merge(source, out, cast, args)
    if source.cfg.pixel_head:
        raise SystemExit(f"--src {args.src} is already an L2P pixel model ({source.layout}); pass a Z-Image checkpoint")
    target_cfg = model.l2p_config(source.cfg, args.patch, args.head_width)
    with torch.device("meta"):
        target = {k: v for k, v in model.ZImageDiT(target_cfg).state_dict().items()}

    copied, dropped = {}, {}
    for key, spec in source.tensors(meta=True):
        if key in target and spec.shape == target[key].shape:
            copied[key] = spec.to(cast) if cast and spec.is_floating_point() else spec
        else:
            dropped[key] = spec
    created = new_tensors(target_cfg, args.seed)
    created = {k: v.to(cast or torch.float32) for k, v in created.items()}
    missing = [k for k in target if k not in copied and k not in created]
    if missing:
        raise SystemExit(f"--src {args.src} ({source.layout}) lacks {len(missing)} tensors the pixel model needs "
                         f"(first: {missing[:5]}); is it a complete Z-Image transformer?")

    specs = {**copied, **{k: v.to("meta") for k, v in created.items()}}

    def stream():
        for key, tensor in source.tensors():
            if key in copied:
                yield key, tensor.to(copied[key].dtype)
        yield from created.items()

    metadata = {"format": "l2p", "l2p_patch": str(args.patch), "head_width": str(args.head_width),
                "source": str(args.src), "source_layout": source.layout, "seed": str(args.seed), "dtype": args.dtype,
                "written_by": "convert.py"}
    start = time.time()
    model.write_safetensors(out, stream(), metadata, specs=specs)

    print(f"source  {args.src} ({source.layout}): {len(copied) + len(dropped)} tensors")
    print(f"copied  {len(copied):4d} tensors {count(copied):>15,d} params  (bit-identical"
          f"{'' if cast is None else ', cast to ' + args.dtype})")
    print(f"created {len(created):4d} tensors {count(created):>15,d} params  "
          f"(all_x_embedder.{args.patch}-1 [{target_cfg.dim}, {args.patch ** 2 * 3}], local_decoder)")
    print(f"dropped {len(dropped):4d} tensors {count(dropped):>15,d} params  ({', '.join(dropped)})")
    print(f"wrote   {out}: {len(specs)} tensors, {count(specs):,d} params, {out.stat().st_size / 1e9:.2f} GB "
          f"in {time.time() - start:.0f} s")
    blocks = min(5, target_cfg.n_layers // 2)
    with torch.device("meta"):
        trainable, frozen = model.set_trainable(model.ZImageDiT(target_cfg), train_blocks=blocks)
    print(f"freeze policy --train-blocks {blocks}: {trainable:,d} trainable, {frozen:,d} frozen parameters")


if __name__ == "__main__":
    model.run_script(main)
