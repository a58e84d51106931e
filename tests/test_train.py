"""train.py on a tiny L2P (convert.py of make_tiny_zimage_repo), on CPU: objective, freeze, resume, multi-process,
data layouts, bad data, NaN stop, and the memory plan against measured memory."""

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
import model
import sample
import train
from tiny import make_tiny_zimage_repo

ROOT = Path(train.__file__).parent
# Tiny runs: fp32 on CPU, res 32 (2 x 2 tokens of 16 px), the tiny DiT's 3 layers (so n = 1), every step logged.
TINY = ["--device", "cpu", "--workers", "0", "--res", "32", "--train-blocks", "1", "--sample-every", "0",
        "--log-every", "1", "--warmup", "0", "--batch-size", "4"]
CAP_DIM = 64  # the tiny text encoder's hidden size = the tiny DiT's cap_feat_dim


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_zimage_repo(tmp_path_factory.mktemp("Z-Image-Turbo"))


@pytest.fixture(scope="module")
def init(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("l2p") / "l2p-init.safetensors"
    convert.main(["--src", str(repo), "--out", str(out), "--recipe", "paper"])
    return out


def picture(i: int, w: int = 48, h: int = 40) -> Image.Image:
    """A smooth, distinct test image (non-square, so resize + centre crop are exercised)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 5 + 60 * i) % 256, (yy * 6) % 256, np.full_like(xx, 50 * i % 256)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def write_synth(folder: Path, n: int = 4, seed: int = 0) -> Path:
    """synth.py's layout: images/, features/ (cached "cap" [L, D]) and metadata.jsonl."""
    (folder / "images").mkdir(parents=True)
    (folder / "features").mkdir()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        picture(i).save(folder / f"images/{i:06d}_s1.png")
        model.write_safetensors(folder / f"features/{i:06d}.safetensors",
                                {"cap": torch.randn(3 + 4 * i, CAP_DIM, generator=g)})
        rows.append({"file_name": f"images/{i:06d}_s1.png", "prompt": f"prompt number {i}", "seed": i,
                     "features": f"features/{i:06d}.safetensors"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def log_rows(out: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


def losses(out: Path, field: str = "loss") -> dict[int, float]:
    return {r["step"]: r[field] for r in log_rows(out)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("data") / "synth")


@pytest.fixture(scope="module")
def lifted_init(repo, synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("lift") / "lift.safetensors"
    convert.main(["--src", str(repo), "--out", str(out), "--align-data", str(synth), "--head-steps", "3"])
    return out


def run(init, data, out, *extra):
    train.main(["--init", str(init), "--data", str(data), "--out", str(out), *TINY, *extra])


def record_sigmas(monkeypatch) -> list[float]:
    """Every sigma the network is called with (the training loop draws them; the samples use their own grid)."""
    seen, forward = [], model.ZImageDiT.forward

    def recording(self, x, sigma, cap, cap_mask, **kwargs):
        if self.training:
            seen.extend(sigma.tolist())
        return forward(self, x, sigma, cap, cap_mask, **kwargs)

    monkeypatch.setattr(model.ZImageDiT, "forward", recording)
    return seen


def test_training_sigmas_are_the_shift_3_grid_and_follow_the_sample_position(init, synth, tmp_path, monkeypatch):
    seen = record_sigmas(monkeypatch)
    run(init, synth, tmp_path / "a", "--max-steps", "6")
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    grid = (3 * u / (1 + 2 * u)).float()
    assert len(seen) == 24 and torch.isin(torch.tensor(seen), grid).all() and len(set(seen)) > 15
    first = list(seen)
    seen.clear()  # micro-batches of 1 draw the same sigma for the same sample position
    run(init, synth, tmp_path / "b", "--max-steps", "6", "--micro-batch", "1")
    assert seen == first


def first_source_states(init: Path, data: Path, vae_path: Path, sigma: torch.Tensor, tokens) -> tuple:
    """train.py --states source's first batch (4 images at 32^2, seed 0), written out: each image x0 with its part in
    the lift's span replaced by s basis^T tokens(vae, x0), noised at sigma. Returns (states, x0, eps)."""
    records = model.find_records(data)
    order = list(train.sample_order(len(records), 4, 0, 1, 0, 0, 1))
    x0 = torch.stack([model.load_image(records[i], 32) for i, _ in order])
    eps = torch.stack([torch.randn(3, 32, 32, generator=train.seeded(0, "noise", p)) for _, p in order])
    net, vae = model.load_model(init, dtype=torch.float32), model.load_vae(vae_path)
    basis, scale = net.lift.basis.double(), net.lift.scale.double()
    with torch.no_grad():
        latent = tokens(vae, x0).double()
    patches = model.patchify(x0.double(), 16)
    start = model.unpatchify(scale * latent @ basis + patches - patches @ basis.T @ basis, 16, 32, 32)
    s = sigma.double().view(-1, 1, 1, 1)
    return (1 - s) * start + s * eps.double(), x0, eps


def test_a_lifted_init_trains_on_its_samplers_states_with_the_x0_error(repo, synth, tmp_path, monkeypatch):
    init = tmp_path / "lift.safetensors"
    convert.main(["--src", str(repo), "--out", str(init), "--align-data", str(synth), "--head-steps", "3",
                  "--head-width", "16"])
    with pytest.raises(SystemExit, match="--states source needs .* --vae"):
        run(init, synth, tmp_path / "no-vae", "--max-steps", "1")
    with pytest.raises(SystemExit, match="--vae is read only with --states source"):
        run(init, synth, tmp_path / "unread-vae", "--max-steps", "1", "--vae", str(repo), "--states", "image")
    calls, forward = [], model.ZImageDiT.forward

    def recording(self, x, sigma, cap, cap_mask, **kwargs):
        v = forward(self, x, sigma, cap, cap_mask, **kwargs)
        if self.training:
            calls.append((x.detach().clone(), sigma.clone(), v.detach().clone(), kwargs))
        return v

    monkeypatch.setattr(model.ZImageDiT, "forward", recording)
    out = tmp_path / "run"
    run(init, synth, out, "--max-steps", "1", "--vae", str(repo), "--micro-batch", "4")
    (x, sigma, v, kwargs), = calls
    assert kwargs == {"span_detail": True}
    # [B, 4, 64]: 2 x 2 latent pixels x 16 channels per 16 x 16 patch
    expected, x0, eps = first_source_states(init, synth, repo, sigma, lambda vae, x0: model.patchify(vae.encode(x0), 2))
    assert ((x.double() - expected).norm() / expected.norm()).item() < 1e-5
    s = sigma.double().view(-1, 1, 1, 1)
    assert ((x.double() - ((1 - s) * x0 + s * eps)).norm() / expected.norm()).item() > 1e-2  # not the image noised
    # the logged loss: the error of the predicted x0 = x - max(sigma, 0.05) v against the image itself
    x0_error = (x.double() - s.clamp_min(model.X0_MIN_SIGMA) * v.double() - x0).square().mean().item()
    assert losses(out)[1] == pytest.approx(x0_error, rel=1e-5)
    # the memory plan holds the source's VAE (fp32 here: 4 bytes per value of its files) and its encoding peak
    plan = log_rows(out, "plan")[0]["plan"]["gpu"]
    vae_files = model.safetensors_files(repo / "vae")
    assert plan["source VAE"] == 4 * sum(t.numel() for f in vae_files for t in load_file(str(f)).values())
    with pytest.raises(SystemExit, match="--vae is read only with --states source"):  # the plan refuses it too
        train.main(["--plan-only", "--init", str(init), "--vae", str(repo), "--states", "image"])
    # the VAE makes the states, so it is part of the run: resuming with another one is refused, with the same one not
    other = tmp_path / "other-vae"
    other.mkdir()
    shutil.copy(repo / "vae" / "config.json", other)
    tensors = {k: v.clone() for f in vae_files for k, v in load_file(str(f)).items()}
    tensors["decoder.conv_out.bias"] += 1e-3
    save_file(tensors, str(other / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(SystemExit, match="--vae not the VAE the run started with"):
        run(init, synth, out, "--max-steps", "2", "--vae", str(other), "--micro-batch", "4", "--resume")
    run(init, synth, out, "--max-steps", "2", "--vae", str(repo), "--micro-batch", "4", "--resume")
    assert sorted(losses(out)) == [1, 2]


def test_loss_falls_frozen_tensors_stay_bit_identical_and_samples_are_written(init, synth, tmp_path):
    out = tmp_path / "run"
    run(init, synth, out, "--max-steps", "24", "--lr", "1e-3", "--sample-every", "12", "--sample-steps", "2",
        "--sample-count", "3")
    curve = list(losses(out).values())
    assert len(curve) == 24 and all(np.isfinite(curve))
    first, last = np.mean(curve[:5]), np.mean(curve[-5:])
    trained = out / "trained.safetensors"
    before, after = fixed_sigma_loss(init, synth), fixed_sigma_loss(trained, synth)
    print(f"loss curve {np.round(curve, 2)}; at fixed sigmas and noise: init {before:.3f}, trained {after:.3f}")
    # the head's output conv starts at zero: `before` is already the loss of predicting v = 0, and 24 steps beat it
    assert last < 0.8 * first and max(curve) < 3 * curve[0] and after < 0.85 * before  # falls, without blowing up

    with safe_open(str(trained), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == model.TRAINED_FORMAT and meta["step"] == "24"
    assert (trained.parent / meta["init"]).resolve() == init.resolve() and not Path(meta["init"]).is_absolute()
    with torch.device("meta"):
        policy = model.ZImageDiT(model.open_checkpoint(init).cfg)
    model.set_trainable(policy, train_blocks=1)
    assert keys == {n for n, p in policy.named_parameters() if p.requires_grad}
    start, loaded = load_file(str(init)), model.load_model(trained, dtype=torch.float32).state_dict()
    frozen = [k for k in start if k not in keys]
    assert frozen and all(torch.equal(loaded[k], start[k]) for k in frozen)
    assert all(not torch.equal(loaded[k], start[k]) for k in keys)  # every trained tensor moved

    for step in (12, 24):
        grid = Image.open(out / "samples" / f"step_{step:06d}.png")
        assert grid.size == (3 * 32, 32)
    row = log_rows(out)[-1]
    assert {"loss", "lr", "grad_norm", "images_per_s", "peak_mem_gib"} <= row.keys()
    plan = log_rows(out, "plan")[0]
    assert plan["micro_batch"] == 4 and not plan["low_memory"]


def test_cpu_defaults_fp32_and_workers_below_the_core_count(init, synth, tmp_path):
    run(init, synth, tmp_path / "run", "--max-steps", "1")  # no --dtype
    start = log_rows(tmp_path / "run", "start")[0]
    assert start["dtype"] == "fp32" and start["device"] == "cpu"
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "run" / "trained.safetensors")).values())
    workers = train.parse_args(["--plan-only"]).workers
    assert 0 <= workers <= 4 and workers < len(os.sched_getaffinity(0))


def test_a_moved_run_folder_samples_and_a_stand_in_init_is_refused(repo, synth, tmp_path):
    project = tmp_path / "project"
    convert.main(["--src", str(repo), "--out", str(project / "l2p-init.safetensors"), "--recipe", "paper"])
    run(project / "l2p-init.safetensors", synth, project / "runs" / "a", "--max-steps", "2", "--lr", "1e-3")
    moved = tmp_path / "elsewhere" / "project"
    (project.parent / "elsewhere").mkdir()
    project.rename(moved)  # the run and its init moved together: the recorded relative path still holds
    trained = moved / "runs" / "a" / "trained.safetensors"
    expected = model.load_model(trained, dtype=torch.float32).state_dict()
    sample_args = ["--text-encoder", str(repo), "--prompt", "a cat", "--res", "32", "--steps", "2", "--device", "cpu"]
    sample.main(["--ckpt", str(trained), *sample_args, "--out", str(tmp_path / "moved.png")])
    assert Image.open(tmp_path / "moved.png").size == (32, 32)
    alone = tmp_path / "alone"
    (moved / "runs" / "a").rename(alone)  # the run folder alone: its init must be named
    with pytest.raises(model.CheckpointError, match="holds only the trained tensors.*--init"):
        model.load_model(alone / "trained.safetensors")
    sample.main(["--ckpt", str(alone / "trained.safetensors"), "--init", str(moved / "l2p-init.safetensors"),
                 *sample_args, "--out", str(tmp_path / "alone.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone.png")), np.asarray(Image.open(tmp_path / "moved.png")))
    loaded = model.load_model(alone / "trained.safetensors", dtype=torch.float32, init=moved / "l2p-init.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    other = tmp_path / "other-init.safetensors"
    convert.main(["--src", str(repo), "--out", str(other), "--seed", "1", "--recipe", "paper"])
    with pytest.raises(model.CheckpointError, match="is not the init"):
        model.load_model(alone / "trained.safetensors", init=other)


@torch.no_grad()
def fixed_sigma_loss(checkpoint: Path, data: Path) -> float:
    """The objective on every image at sigma 0.2, 0.5 and 0.8 with fixed noise (written here independently)."""
    net = model.load_model(checkpoint, dtype=torch.float32)
    records = model.find_records(data)
    batch = model.collate([model.ImageCaptionDataset(records, 32)[(i, i)] for i in range(len(records))])
    x0 = batch["image"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(123))
    losses = []
    for s in (0.2, 0.5, 0.8):
        v = net((1 - s) * x0 + s * noise, torch.full((len(x0),), s), batch["cap"], batch["cap_mask"])
        losses.append((v - (noise - x0)).square().mean().item())
    return float(np.mean(losses))


@pytest.mark.parametrize("fan_in", [0, 288])
def test_head_lr_fan_in_slows_each_wide_head_convolution_by_its_fan_in(init, fan_in):
    net = model.load_model(init, dtype=torch.float32)
    model.set_trainable(net, 1)
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    args = argparse.Namespace(lr=1e-3, head_lr_fan_in=fan_in, weight_decay=0.0, ema=0.0)
    weights = train.MasterWeights(net, {n: t.clone() for n, t in before.items()}, args, hook=True, zero=False)
    g = torch.Generator().manual_seed(0)
    signs = {n: torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0) for n, p in trained.items()}
    sum((p * signs[n]).sum() for n, p in trained.items()).backward()  # gradients +-1: far above AdamW's eps
    weights.step(args.lr, grad_clip=0)
    # AdamW's first step moves every element by lr x its multiplier: m / sqrt(v) = g / |g| = +-1
    step = {n: (trained[n].detach() - before[n]).abs() for n in trained}
    head = net.local_decoder
    deepest = getattr(head, f"dec{head.levels[-1][0]}")[0]  # [up, skip] -> 3x3: the widest fan-in of the head
    expected = min(1.0, fan_in / (deepest.in_channels * 9)) if fan_in else 1.0
    prefix = f"local_decoder.dec{head.levels[-1][0]}.0."
    assert deepest.in_channels * 9 > 288  # the tiny head is wide enough for the test to see a slowed tensor
    for name in (prefix + "weight", prefix + "bias"):
        torch.testing.assert_close(step[name], torch.full_like(step[name], 1e-3 * expected), rtol=1e-3, atol=0)
    for name in ("local_decoder.out_conv.weight", "layers.0.attention.to_q.weight", "all_x_embedder.16-1.weight"):
        torch.testing.assert_close(step[name], torch.full_like(step[name], 1e-3), rtol=1e-3, atol=0)


def test_resume_continues_exactly(init, synth, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = ("--lr", "1e-3", "--ema", "0.9", "--warmup", "3")
    run(init, synth, straight, "--max-steps", "6", "--save-every", "3", *common)
    run(init, synth, interrupted, "--max-steps", "3", *common)
    with pytest.raises(SystemExit, match="already holds a run"):
        run(init, synth, interrupted, "--max-steps", "6", *common)
    with pytest.raises(SystemExit, match="--seed is 1 but the run started with 0"):
        run(init, synth, interrupted, "--max-steps", "6", "--resume", "--seed", "1", *common)
    run(init, synth, interrupted, "--max-steps", "6", "--resume", *common)

    a, b = losses(straight), losses(interrupted)
    assert list(a) == list(range(1, 7)) and list(b) == list(range(1, 7))
    assert np.allclose(list(a.values()), list(b.values()), rtol=1e-6, atol=0)
    for name in ("trained.safetensors", "trained_ema.safetensors"):
        x, y = load_file(str(straight / name)), load_file(str(interrupted / name))
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=0, atol=1e-6) for k in x)
    state = torch.load(interrupted / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["samples_seen"] == 24
    # a resume must not change the trajectory (--lr and --grad-clip may: the remedy after a stop), and one past
    # --max-steps or from a damaged state says so
    with pytest.raises(SystemExit, match="--warmup is 4 but the run started with 3"):
        run(init, synth, interrupted, "--max-steps", "9", "--resume", *common, "--warmup", "4")
    with pytest.raises(SystemExit, match="the run is at step 6, past --max-steps 3; raise --max-steps"):
        run(init, synth, interrupted, "--max-steps", "3", "--resume", *common)
    (interrupted / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="train_state.pt .or a shard beside it. cannot be read"):
        run(init, synth, interrupted, "--max-steps", "9", "--resume", *common)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def updates_differ(single: Path, double: Path, init: Path) -> float:
    """max over trained tensors of |w1 - w2| / |w1 - w0|: how far two runs' updates differ, relative to the update.
    Summation order makes the two differ in the last bits, and AdamW's 1 / sqrt(v) magnifies that where a gradient
    sits near its eps (seen: 1.8e-3 on 53 of 294,912 elements), but not in the norm of a whole tensor's update;
    a gradient left unreduced, or reduced twice, moves whole tensors."""
    x, y, start = (load_file(str(p)) for p in (single / "trained.safetensors", double / "trained.safetensors", init))
    assert x.keys() == y.keys()
    return max(((x[k] - y[k]).norm() / (x[k] - start[k]).norm()).item() for k in x)


@pytest.mark.parametrize("mode", ["ddp", "ddp-zero", "low-memory"])
def test_two_gloo_processes_match_one(init, synth, tmp_path, mode):
    """Same global batch 4: one process (micro-batch 4, fp32 accumulation hook) vs two under DistributedDataParallel
    (2 each in micro-batches of 1, so they accumulate under no_sync too); ZeroRedundancyOptimizer shards AdamW's
    state between them; in low-memory mode both keep masters and AdamW on the CPU."""
    flags = {"ddp": ["--no-zero"], "ddp-zero": ["--zero"], "low-memory": ["--low-memory"]}[mode]
    common = ["--init", str(init), "--data", str(synth), *TINY, "--max-steps", "4", "--lr", "1e-3"]
    single = tmp_path / "single"
    train.main([*common, "--out", str(single)])
    double = tmp_path / "double"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "train.py", *common, *flags, "--out", str(double), "--micro-batch", "1"],
                              cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    plan = log_rows(double, "plan")[0]
    assert (plan["world"], plan["micro_batch"], plan["low_memory"], plan["zero"]) == (
        2, 1, mode == "low-memory", mode == "ddp-zero")
    a, b = losses(single), losses(double)
    assert list(a) == list(b) == [1, 2, 3, 4]
    assert np.allclose(list(a.values()), list(b.values()), rtol=1e-5)
    norms = [list(losses(out, "grad_norm").values()) for out in (single, double)]
    assert np.allclose(*norms, rtol=1e-4)  # AdamW hides a gradient scaled by the world size; its norm does not
    differ = updates_differ(single, double, init)
    print(f"one vs two processes: updates differ by up to {differ:.2e} of their norm")
    assert differ < 1e-2
    if mode == "ddp-zero":  # rank 1's shard of the AdamW state
        shard = torch.load(double / "train_state.rank1.pt", weights_only=True)
        full = torch.load(single / "train_state.pt", weights_only=True)["adamw"]
        assert shard["adamw"] and len(shard["adamw"]) < len(full)


def test_low_memory_mode_matches_standard(init, synth, tmp_path):
    run(init, synth, tmp_path / "standard", "--max-steps", "3", "--lr", "1e-3", "--micro-batch", "2")
    run(init, synth, tmp_path / "low", "--max-steps", "3", "--lr", "1e-3", "--micro-batch", "2", "--low-memory")
    assert log_rows(tmp_path / "low", "plan")[0]["plan"]["host_total"] > 0
    assert losses(tmp_path / "standard") == losses(tmp_path / "low")
    x, y = (load_file(str(tmp_path / d / "trained.safetensors")) for d in ("standard", "low"))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_folder_layouts_with_the_text_encoder_and_tar_shards(repo, init, tmp_path):
    # DiffSynth style: metadata.csv with file_name + text; jsonl with image + prompt
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for i in range(3):
        picture(i, 64, 32).convert("RGB").save(csv_dir / f"{i}.jpg")
    rows = "".join(f"{i}.jpg,a photo of cat {i}\n" for i in range(3))
    (csv_dir / "metadata.csv").write_text("file_name,text\n" + rows)
    jsonl_dir = tmp_path / "jsonl"
    (jsonl_dir / "img").mkdir(parents=True)
    for i in range(2):
        picture(i).save(jsonl_dir / f"img/{i}.webp")
    rows = [json.dumps({"image": f"img/{i}.webp", "prompt": f"dog {i}"}) for i in range(2)]
    (jsonl_dir / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    # webdataset shards: key.jpg + key.txt in one, key.png + key.json in the other, plus a key without a caption
    shards = tmp_path / "shards"
    shards.mkdir()
    for s, (ext, caption_ext) in enumerate([("jpg", "txt"), ("png", "json")]):
        with tarfile.open(shards / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(2):
                members = {f"{s}{i:04d}.{ext}": image_bytes(picture(i + s), ext),
                           f"{s}{i:04d}.{caption_ext}": (f"a tree {s} {i}" if caption_ext == "txt" else
                                                          json.dumps({"caption": f"a tree {s} {i}"})).encode()}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("orphan.jpg")
            data = image_bytes(picture(0), "jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    for data, n in ((csv_dir, 3), (jsonl_dir, 2), (shards, 4)):
        records = model.find_records(data)
        assert len(records) == n and all(r.caption for r in records)
        image = model.load_image(records[-1], 32)
        assert image.shape == (3, 32, 32) and -1 <= image.min() < image.max() <= 1
        out = tmp_path / f"run-{data.name}"
        run(init, data, out, "--max-steps", "2", "--text-encoder", str(repo), "--sample-every", "2",
            "--sample-steps", "1")
        assert len(losses(out)) == 2 and (out / "samples" / "step_000002.png").exists()
        features = sorted((out / "features").glob("*.safetensors"))
        assert len(features) == n + 1  # every caption and the empty negative prompt
        assert model.safetensors_shapes(features[:1])["cap"][1] == CAP_DIM


def image_bytes(image: Image.Image, ext: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG"}[ext])
    return buffer.getvalue()


def test_a_corrupt_image_is_skipped_counted_and_reported(init, tmp_path, capsys):
    data = write_synth(tmp_path / "synth")
    (data / "images" / "000002_s1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "run"
    run(init, data, out, "--max-steps", "3")
    printed = capsys.readouterr().out
    assert re.search(r"skipped unreadable image images/000002_s1\.png: \w+", printed)
    summary = log_rows(out, "summary")[0]
    assert summary["unreadable"] == ["images/000002_s1.png"] and summary["skipped_images"] == 3  # once per epoch
    assert all(np.isfinite(list(losses(out).values())))
    for image in (data / "images").iterdir():  # nothing readable: no step trains, and the run fails in one line
        image.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="no step trained: all 2 were skipped; check --data"):
        run(init, data, tmp_path / "unreadable", "--max-steps", "2")


def test_nan_losses_stop_the_run_with_a_checkpoint(init, synth, tmp_path, monkeypatch):
    calls, forward = {"n": 0}, model.ZImageDiT.forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += self.training
        v = forward(self, *args, **kwargs)
        return v * float("nan") if self.training and calls["n"] > 2 else v

    monkeypatch.setattr(model.ZImageDiT, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="stopped at step 5: 3 steps in a row had a non-finite loss"):
        run(init, synth, out, "--max-steps", "20", "--max-bad-steps", "3", "--lr", "1e-3")
    assert [r["step"] for r in log_rows(out, "skipped_step")] == [3, 4, 5]
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 5
    trained = load_file(str(out / "trained.safetensors"))
    assert all(torch.isfinite(t).all() for t in trained.values())
    monkeypatch.setattr(model.ZImageDiT, "forward", forward)  # the checkpoint resumes (from the last good weights)
    run(init, synth, out, "--max-steps", "6", "--resume", "--lr", "1e-3")
    assert list(losses(out)) == [1, 2, 6]


def test_a_non_finite_sample_grid_does_not_stop_training(init, synth, tmp_path, monkeypatch):
    forward = model.ZImageDiT.forward  # finite in training, inf when sampling: the grid is written, the run goes on
    monkeypatch.setattr(model.ZImageDiT, "forward", lambda self, *a, **k: forward(self, *a, **k) * (
        1.0 if self.training else float("inf")))
    run(init, synth, tmp_path / "run", "--max-steps", "4", "--sample-every", "2")
    assert log_rows(tmp_path / "run", "summary") and len(list((tmp_path / "run" / "samples").glob("*.png"))) == 2


def test_bad_inputs_give_clear_errors(repo, init, synth, tmp_path):
    cases = [(["--res", "40"], "--res 40 must be a multiple of the model's patch 16"),
             (["--micro-batch", "3"], "--micro-batch 3 must divide the per-process batch 4"),
             (["--train-blocks", "2"], "needs 0 <= 2n <= 3 blocks")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            run(init, synth, tmp_path / "x", "--max-steps", "1", *extra)
    with pytest.raises(SystemExit, match="latent source checkpoint"):
        run(repo, synth, tmp_path / "x", "--max-steps", "1")
    with pytest.raises(SystemExit, match="found no metadata.jsonl"):
        run(init, tmp_path, tmp_path / "x", "--max-steps", "1")
    uncaptioned = tmp_path / "plain"
    uncaptioned.mkdir()
    picture(0).save(uncaptioned / "a.png")
    (uncaptioned / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "x"}) + "\n")
    with pytest.raises(SystemExit, match="no cached text features.*pass --text-encoder"):
        run(init, uncaptioned, tmp_path / "x", "--max-steps", "1")
    (uncaptioned / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")
    with pytest.raises(SystemExit, match="no caption"):
        run(init, uncaptioned, tmp_path / "x", "--max-steps", "1")


def test_plan_only_prints_the_real_size_plan_of_each_mode(capsys):
    train.main(["--plan-only"])
    printed = capsys.readouterr().out
    print(printed)
    assert "6,166,464,515 params, 2,548,257,795 trainable" in printed
    totals, title = {}, None
    for line in printed.splitlines():
        if not line.startswith(("  ", "L2P")):
            title = line
        elif line.startswith("  total per GPU"):
            totals[title] = (float(line.split()[3]), float(line.split()[6]))
    assert len(totals) == 4
    gpu, host = totals["low memory, micro-batch 1, 1 GPU (24 GB card)"]
    assert gpu < 24e9 / 2 ** 30 - 1 and host < 32 - 3  # a 24 GB card, 32 GiB of host memory with the libraries
    assert totals["standard + ZeRO, micro-batch 1, 8 GPUs"][0] < totals["standard, micro-batch 1, 8 GPUs (the paper's setup)"][0] < 80


MEASURE_SCRIPT = """
import ctypes, gc, json, sys
from pathlib import Path
import train

def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

warm, measured = sys.argv[1], sys.argv[2]
common = sys.argv[3:]
train.main([*common, "--out", warm, "--max-steps", "1", "--res", "32"])  # imports and lazy library set-up
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
base = kib("VmRSS")
train.main([*common, "--out", measured, "--max-steps", "3"])
print((kib("VmHWM") - base) * 1024)
"""


@pytest.mark.parametrize("res,extra,lifted", [
    (96, [], False), (64, ["--low-memory", "--ema", "0.99", "--no-grad-checkpointing"], False), (96, [], True)],
    ids=["standard-96px", "low-memory-ema-no-checkpointing-64px", "lifted-head-only-source-states-96px"])
def test_the_plan_predicts_measured_peak_memory(request, repo, synth, tmp_path, res, extra, lifted):
    """On CPU the GPU and host parts of the plan share one memory: their sum must match the growth of the peak RSS
    over a few steps (after a warm-up run has loaded the libraries), within 25%."""
    init = request.getfixturevalue("lifted_init" if lifted else "init")
    extra = [*extra, "--vae", str(repo)] if lifted else extra
    common = ["--init", str(init), "--data", str(synth), *TINY, "--res", str(res), *extra]
    run_ = subprocess.run([sys.executable, "-c", MEASURE_SCRIPT, str(tmp_path / "warm"), str(tmp_path / "measured"),
                           *common], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    measured = int(run_.stdout.split()[-1])
    plan = log_rows(tmp_path / "measured", "plan")[0]["plan"]
    predicted = plan["gpu_total"] + plan["host_total"]
    print(f"res {res} {extra}: plan {predicted / 2**20:.0f} MiB ({plan['gpu']['activations'] / 2**20:.0f} MiB "
          f"activations), measured peak RSS growth {measured / 2**20:.0f} MiB, ratio {measured / predicted:.2f}")
    assert 0.75 < measured / predicted < 1.25
