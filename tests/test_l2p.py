"""The L2P pixel model and convert.py: layout, bit-exact transfer, Detailer Head, freeze policy, memory."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import convert
import model
from tiny import (give_head_an_output, make_diffusers_dit, read_format, save_single_file, to_comfy,
                  write_random_dit_folder)

ROOT = Path(model.__file__).parent


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def captions(lens, dim=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    cap = torch.randn(len(lens), max(lens), dim, generator=g)
    return cap, torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ref = make_diffusers_dit()
    folder = tmp_path_factory.mktemp("zimage") / "transformer"
    ref.save_pretrained(folder, max_shard_size="100KB")
    return ref, folder


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("l2p") / "l2p-init.safetensors"
    convert.main(["--src", str(source[1]), "--out", str(out), "--patch", "16", "--recipe", "paper"])
    return give_head_an_output(out)


def test_convert_copies_bit_identical_and_creates_the_new_parts(source, converted):
    ref, _ = source
    src, out = ref.state_dict(), load_file(str(converted))
    new = {k for k in out if k not in src}
    assert all(torch.equal(out[k], src[k]) and out[k].dtype == src[k].dtype for k in out if k in src)
    assert out["all_x_embedder.16-1.weight"].shape == (64, 16 * 16 * 3)
    assert {k.split(".")[0] for k in new} == {"all_x_embedder", "local_decoder"}
    assert not any(k.startswith(("all_x_embedder.2-1", "all_final_layer")) for k in out)
    assert len(out) == len(src) - 6 + 2 + 4 * 3 * 2 + 2 + 2  # - latent embedder, final layer; + embedder, head
    with safe_open(str(converted), "pt") as f:
        meta = f.metadata()
    assert meta["l2p_patch"] == "16" and meta["format"] == "l2p" and meta["seed"] == "0"
    assert not list(converted.parent.glob(".*.tmp"))


def test_convert_from_comfy_single_file_equals_from_folder(source, converted, tmp_path):
    ref, _ = source
    single = save_single_file(to_comfy(ref.state_dict(), prefix="model.diffusion_model.", norm_final=True),
                              tmp_path / "z_image_turbo_bf16.safetensors")
    out = tmp_path / "from-comfy.safetensors"
    convert.main(["--src", str(single), "--out", str(out), "--recipe", "paper"])
    a, b = load_file(str(give_head_an_output(out))), load_file(str(converted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_narrow_head_round_trips_through_convert_and_load(source, tmp_path):
    out = tmp_path / "toy.safetensors"
    convert.main(["--src", str(source[1]), "--out", str(out), "--head-width", "16", "--recipe", "paper"])
    toy = model.load_model(out, dtype=torch.float32)
    assert toy.cfg.head_width == 16 and toy.local_decoder.enc1[0].out_channels == 16
    assert toy.local_decoder.enc4[0].out_channels == 128


def test_convert_refuses_pixel_and_incomplete_sources(converted, source, tmp_path):
    with pytest.raises(SystemExit, match="already an L2P"):
        convert.main(["--src", str(converted), "--out", str(tmp_path / "x.safetensors")])
    state = dict(source[0].state_dict())
    state.pop("layers.1.feed_forward.w1.weight")
    broken = save_single_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(SystemExit, match=r"lacks 1 tensors.*layers\.1\.feed_forward\.w1"):
        convert.main(["--src", str(broken), "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


@torch.no_grad()
def test_pixel_transformer_matches_diffusers_trunk_and_head_matches_unrolled_unet(converted):
    """The trunk on 16x16 RGB patches equals diffusers' (a hook reads its last layer); the head equals the
    released forward written out level by level."""
    ours = model.load_model(converted, dtype=torch.float32)
    assert ours.cfg.pixel_head and ours.cfg.patch_size == 16 and ours.cfg.in_channels == 3
    trunk = make_diffusers_dit(all_patch_size=(16,), in_channels=3)
    trunk.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("local_decoder")},
                          strict=False)
    last = {}
    trunk.layers[-1].register_forward_hook(lambda m, i, o: last.update(out=o))
    x = torch.rand(2, 3, 48, 32) * 2 - 1
    sigma = torch.tensor([0.9, 0.3])
    cap, mask = captions((5, 40))
    v = ours(x, sigma, cap, mask)
    trunk([xi.unsqueeze(1) for xi in x], 1 - sigma, [c[m] for c, m in zip(cap, mask)], patch_size=16)
    token_map = last["out"][:, :6].transpose(1, 2).reshape(2, 64, 3, 2)  # 3 x 2 tokens, image first

    d = ours.local_decoder
    conv = lambda seq, t: F.silu(seq[0](t))
    e1 = conv(d.enc1, x)
    e2 = conv(d.enc2, F.max_pool2d(e1, 2))
    e3 = conv(d.enc3, F.max_pool2d(e2, 2))
    e4 = conv(d.enc4, F.max_pool2d(e3, 2))
    h = conv(d.bottleneck, torch.cat([F.max_pool2d(e4, 2), token_map], 1))
    for up, dec, skip in ((d.up4, d.dec4, e4), (d.up3, d.dec3, e3), (d.up2, d.dec2, e2), (d.up1, d.dec1, e1)):
        h = conv(dec, torch.cat([up[1](F.interpolate(h, scale_factor=2, mode="nearest")), skip], 1))
    expected_v = -d.out_conv(h)
    assert rel(v, expected_v) < 1e-5


@pytest.mark.parametrize("H,W", [(16, 16), (48, 16), (32, 80)])
def test_any_multiple_of_the_patch_and_batch_mates_do_not_matter(converted, H, W):
    ours = model.load_model(converted, dtype=torch.float32)
    x = torch.randn(3, 3, H, W)
    sigma = torch.tensor([1.0, 0.5, 0.01])
    cap, mask = captions((1, 33, 7))
    v = ours(x, sigma, cap, mask)
    assert v.shape == x.shape and torch.isfinite(v).all()
    for i, n in enumerate((1, 33, 7)):
        assert rel(ours(x[i:i + 1], sigma[i:i + 1], cap[i:i + 1, :n], mask[i:i + 1, :n]), v[i:i + 1]) < 1e-5
    with pytest.raises(ValueError, match="multiples of the patch 16"):
        ours(x[..., :H - 8, :], sigma, cap, mask)


@pytest.mark.parametrize("strict", [False, True])
def test_backward_reaches_only_trainable_parameters(converted, strict):
    ours = model.load_model(converted, dtype=torch.float32).train()
    ours.gradient_checkpointing = True
    trainable, frozen = model.set_trainable(ours, train_blocks=1, strict=strict)
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "layers.1.attention.to_q.weight" not in names and "layers.0.attention.to_q.weight" in names
    assert "layers.2.attention.to_q.weight" in names and "local_decoder.out_conv.weight" in names
    assert ("noise_refiner.0.feed_forward.w1.weight" in names) == (not strict)
    assert ("t_embedder.mlp.0.weight" in names) == (not strict)
    x = torch.randn(2, 3, 32, 16)
    cap, mask = captions((3, 9))
    ours(x, torch.tensor([0.7, 0.2]), cap, mask).square().mean().backward()
    for name, p in ours.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert trainable == sum(p.numel() for p in ours.parameters() if p.grad is not None) and frozen > 0


def test_released_layout_with_mixed_dtypes_loads_and_runs(converted, tmp_path):
    state = load_file(str(converted))
    mixed = {k: v.to(torch.float32 if k.startswith("layers.1.") else torch.bfloat16) for k, v in state.items()}
    path = save_single_file(mixed, tmp_path / "model-1k-merge.safetensors")
    ours = model.load_model(path, dtype=torch.bfloat16)
    cap, mask = captions((4,))
    v = ours(torch.randn(1, 3, 32, 32), torch.tensor([0.5]), cap, mask)
    assert torch.isfinite(v).all() and "L2P pixel checkpoint" in model.open_checkpoint(path).layout


@pytest.mark.parametrize("patch,levels", [(32, 5), (64, 6), (128, 7)])
def test_head_levels_follow_the_patch(patch, levels):
    head = model.DetailerHead(3, 8, patch)
    assert len(head.levels) == levels and head.bottleneck[0].in_channels == 512 + 8
    assert model.DetailerHead(3, 8, patch, width=16).bottleneck[0].in_channels == 128 + 8
    out = head(torch.randn(1, 3, patch, 2 * patch), torch.randn(1, 8, 1, 2))
    assert out.shape == (1, 3, patch, 2 * patch)
    with pytest.raises(ValueError, match="16, 32, 64 or 128"):
        model.DetailerHead(3, 8, 24)


@torch.no_grad()
def test_a_fresh_head_predicts_zero_and_hears_the_token_map():
    """The output conv starts at zero; behind it, the token map moves the features about as much as the noisy image
    does (PyTorch's default conv init left the token path ~500x weaker: 5e-4 relative, against 0.3 for the image)."""
    torch.manual_seed(0)
    head = model.DetailerHead(3, 64, 16, width=16)
    x, tokens = torch.randn(2, 3, 64, 64), 3 * torch.randn(2, 64, 4, 4)
    assert not head(x, tokens).any()
    features = lambda x, t: _head_features(head, x, t)
    base = features(x, tokens)
    moved = lambda other: ((features(*other) - base).norm() / base.norm()).item()
    by_tokens, by_image = moved((x, 3 * torch.randn(2, 64, 4, 4))), moved((torch.randn(2, 3, 64, 64), tokens))
    assert by_tokens > 0.25 and by_tokens > 0.3 * by_image, (by_tokens, by_image)


def _head_features(head, x, token_map):
    """The head's forward up to (not including) the output conv."""
    out_conv, head.out_conv = head.out_conv, torch.nn.Identity()
    try:
        return head(x, token_map)
    finally:
        head.out_conv = out_conv


@pytest.mark.parametrize("patch,name,tensors,params,trainable", [
    (16, "l2p-1k", 545, 6_166_464_515, 2_548_257_795),
    (64, "l2p-4k", 557, 6_210_711_491, 2_592_504_771)])
def test_real_size_matches_the_released_layouts(patch, name, tensors, params, trainable):
    with torch.device("meta"):
        pixel = model.ZImageDiT(model.l2p_config(model.ZImageConfig(), patch))
    assert {k: tuple(v.shape) for k, v in pixel.state_dict().items()} == read_format(name)
    assert len(pixel.state_dict()) == tensors and sum(p.numel() for p in pixel.parameters()) == params
    assert model.set_trainable(pixel) == (trainable, params - trainable)


PEAK_RSS_SCRIPT = """
import sys
import convert
def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
base = kib("VmRSS")
convert.main(sys.argv[1:])
print((kib("VmHWM") - base) * 1024)
"""


def test_convert_streams_a_few_hundred_mb_checkpoint(tmp_path):
    folder, size, _ = write_random_dit_folder(tmp_path / "transformer")
    out = tmp_path / "l2p.safetensors"
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, "--src", str(folder), "--out", str(out), "--recipe",
                          "paper"],
                         capture_output=True, text=True, check=True, cwd=str(ROOT))
    ratio = int(run.stdout.split()[-1]) / size
    print(f"convert.py on a {size / 1e6:.0f} MB checkpoint: peak RSS growth {ratio:.2f}x")
    assert size > 150e6 and ratio < 1.5 and out.stat().st_size > 0.9 * size


def test_trained_checkpoint_loads_over_its_init_and_merges(converted, tmp_path):
    """train.py writes only the trained tensors + the init's path; load_model and convert.py complete them."""
    init = load_file(str(converted))
    trained = {k: torch.randn_like(v).to(torch.bfloat16) for k, v in init.items() if k.startswith(("layers.0.", "local_"))}
    path = tmp_path / "trained.safetensors"
    model.write_safetensors(path, trained, {"format": model.TRAINED_FORMAT, "init": str(converted)})
    loaded = model.load_model(path, dtype=torch.float32).state_dict()
    assert loaded.keys() == init.keys()
    assert all(torch.equal(loaded[k], (trained[k] if k in trained else init[k]).float()) for k in init)
    merged = tmp_path / "merged.safetensors"
    convert.main(["--src", str(path), "--out", str(merged)])
    out = load_file(str(merged))
    assert out.keys() == init.keys() and all(torch.equal(out[k], trained.get(k, init[k])) for k in init)
    orphan = tmp_path / "orphan.safetensors"
    model.write_safetensors(orphan, trained, {"format": model.TRAINED_FORMAT, "init": "missing.safetensors"})
    with pytest.raises(model.CheckpointError, match="only the trained tensors"):
        model.load_model(orphan)
