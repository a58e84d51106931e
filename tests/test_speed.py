"""bench/speed.py at --size tiny: every section runs and writes its JSON, every measured number is positive and
finite, and the FLOPs it reports are those of a count by hand. No timing is ever asserted."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import speed  # noqa: E402

import model  # noqa: E402

OUTPUTS = [name for name, _, _ in speed.OUTPUT_SIZES]


def numbers(tree, path=""):
    """(path, value) of every number in a JSON tree, booleans left out."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "speed.json"
    result = speed.main(["--device", "cpu", "--size", "tiny", "--out", str(out)])
    return result, json.loads(out.read_text())


def test_json_is_written_and_complete(tiny_run):
    result, saved = tiny_run
    assert saved == json.loads(json.dumps(result))
    assert {"meta", "matmul_peak", "dit", "dit_flux2", "sampling", "training"} <= set(saved)
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["size"] == "tiny" and saved["meta"]["torch"]


def test_measured_numbers_are_positive_and_finite(tiny_run):
    _, saved = tiny_run
    for path, value in numbers({k: v for k, v in saved.items() if k != "meta"}):
        assert math.isfinite(value), path
        if not path.endswith(("rel_diff_vs_ours", "plan_host_bytes")) and "/config/" not in path:  # may be 0:
            # two implementations agree, a memory mode keeps nothing on the host, a config field is off
            assert value > 0, path
    for path, value in numbers(saved["meta"]):
        assert math.isfinite(value) and value >= 0, path


def test_flux2_dit_section(tiny_run):
    _, saved = tiny_run
    dit = saved["dit_flux2"]
    assert set(dit["implementations"]) == {"ours", "diffusers"} and dit["family"] == "flux2"
    assert dit["implementations"]["diffusers"]["rel_diff_vs_ours"] < 1e-4  # the same weights, the same v
    assert set(dit["ratios"]["ours/diffusers"]) == {"forward", "forward_backward"}


def test_dit_section(tiny_run):
    _, saved = tiny_run
    dit = saved["dit"]
    # diffusers is a test requirement, so it must have been measured
    assert set(dit["implementations"]) == {"ours", "diffusers"} and not dit["unavailable"]
    for ratios in (dit["ratios"], dit["paired_ratios"]):
        assert set(ratios["ours/diffusers"]) == {"forward", "forward_backward"}
    reps = speed.SIZES["tiny"].reps
    for name, res in dit["implementations"].items():
        assert len(res["forward_s"]) == len(res["forward_backward_s"]) == reps
        if name != "ours":
            assert res["rel_diff_vs_ours"] < 1e-4  # the same weights: the same v up to fp32 rounding


def test_sampling_section(tiny_run):
    _, saved = tiny_run
    rows = saved["sampling"]["rows"]
    assert [(r["output"], r["model"]) for r in rows] == [(o, m) for o in OUTPUTS for m in ("source", "L2P")]
    for r in rows:
        assert "error" not in r and {"step_s", "gflop_per_step", "peak_bytes", "tokens"} <= set(r)
        assert ("decode_s" in r) == (r["model"] == "source")
    l2p_tokens = {r["tokens"] for r in rows if r["model"] == "L2P"}
    source_tokens = [r["tokens"] for r in rows if r["model"] == "source"]
    assert len(l2p_tokens) == 1 and source_tokens == [source_tokens[0] * 4 ** i for i in range(3)]
    assert set(saved["sampling"]["summary"]) == set(OUTPUTS)


def test_training_section_runs_train_py_in_both_memory_modes(tiny_run):
    _, saved = tiny_run
    rows = saved["training"]["rows"]
    assert [r["mode"] for r in rows] == ["standard", "low-memory"]
    for row in rows:
        assert "error" not in row, row
        assert {"images_per_s", "mfu", "peak_bytes", "train_tflop_per_step", "plan_gpu_bytes"} <= set(row)
        assert len(row["losses"]) == speed.SIZES["tiny"].train_steps + 1  # train.py's log, every step
    assert rows[0]["losses"] == rows[1]["losses"]  # fp32 on the CPU: the two modes take the same steps
    assert rows[0]["plan_host_bytes"] == 0 < rows[1]["plan_host_bytes"]


def test_vae_decode_bands_keep_the_shape():
    vae = speed.build(lambda: model.FluxVAE(speed.SIZES["tiny"].vae_config()), "cpu", torch.float32, seed=0)
    latent = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        whole, one = speed.decode_in_bands(vae, latent)
        banded, bands = speed.decode_in_bands(vae, latent, limit=1000)
    assert one == 1 and bands > 1 and banded.shape == whole.shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, against counts by hand
# ----------------------------------------------------------------------------------------------------------------


def zimage_dit_flops(cfg: model.ZImageConfig, N: int, L: int) -> tuple[int, int]:
    """(matmul, attention) FLOPs of one sample's forward through Z-Image's DiT with N image and L caption tokens (each
    run padded to 32): 2 per multiply-add of the linear layers; attention's two products, 2 S^2 d each over all
    heads, so 4 S^2 dim per block."""
    D, F, A, patch_dim = cfg.dim, cfg.ffn_dim, cfg.adaln_dim, cfg.patch_size ** 2 * cfg.in_channels
    Np, Lp = -(-N // 32) * 32, -(-L // 32) * 32
    linear = lambda S, modulated: 2 * S * D * 4 * D + 2 * S * 3 * D * F + modulated * 2 * A * 4 * D  # noqa: E731
    matmul = (2 * (256 * 1024 + 1024 * A) + 2 * Lp * cfg.cap_feat_dim * D + 2 * N * patch_dim * D  # t, caption, patch
              + cfg.n_refiner_layers * (linear(Np, True) + linear(Lp, False)) + cfg.n_layers * linear(Np + Lp, True)
              + (0 if cfg.pixel_head else 2 * A * D + 2 * N * D * patch_dim))  # the latent model's final layer
    attention = 4 * D * (cfg.n_refiner_layers * (Np ** 2 + Lp ** 2) + cfg.n_layers * (Np + Lp) ** 2)
    return matmul, attention


def tiny_detailer_head_flops() -> int:
    """The tiny L2P's Detailer Head on a 64^2 image (patch 16, width 8: levels of 8 / 16 / 32 / 64 channels at 64^2 ..
    8^2; the DiT's 64 channels join at 4^2): 2 FLOPs per multiply-add of each convolution, 3x3 unless said."""
    conv = lambda side, c_out, c_in, k=3: 2 * side * side * c_out * c_in * k * k  # noqa: E731
    encoder = conv(64, 8, 3) + conv(32, 16, 8) + conv(16, 32, 16) + conv(8, 64, 32)
    bottleneck = conv(4, 64, 64 + 64, k=1)
    up = conv(8, 64, 64) + conv(16, 32, 32) + conv(32, 16, 16) + conv(64, 8, 8)  # each after a nearest 2x
    decoder = conv(8, 32, 2 * 64) + conv(16, 16, 2 * 32) + conv(32, 8, 2 * 16) + conv(64, 8, 2 * 8)  # on [up, skip]
    return encoder + bottleneck + up + decoder + conv(64, 3, 8, k=1)


def test_sampling_flops_are_the_hand_count(tiny_run):
    _, saved = tiny_run
    size = speed.SIZES["tiny"]
    rows = {(r["output"], r["model"]): r for r in saved["sampling"]["rows"]}
    for output in OUTPUTS:  # the source: 16 pixels per token side (VAE x8, latent patch 2)
        hand = sum(zimage_dit_flops(size.dit_config(), (rows[output, "source"]["pixels"] // 16) ** 2,
                                    size.sample_cap_len))
        assert rows[output, "source"]["gflop_per_step"] * 1e9 == pytest.approx(hand, rel=1e-12)
    hand = sum(zimage_dit_flops(size.l2p_config(16), 4 * 4, size.sample_cap_len)) + tiny_detailer_head_flops()
    assert rows["1K", "L2P"]["gflop_per_step"] * 1e9 == pytest.approx(hand, rel=1e-12)


def test_training_flops_are_the_hand_count(tiny_run):
    """The tiny L2P at 64^2 under the default freeze policy (main layers 1 and 2 of 0-3 frozen, all else trains)."""
    _, saved = tiny_run
    size, cfg = speed.SIZES["tiny"], speed.SIZES["tiny"].l2p_config(16)
    matmul, attention = zimage_dit_flops(cfg, 4 * 4, size.sample_cap_len)
    forward = matmul + attention + tiny_detailer_head_flops()
    D, F, A, S = cfg.dim, cfg.ffn_dim, cfg.adaln_dim, 32 + 32  # the joint sequence: image and caption runs of 32
    frozen = 2 * (2 * S * D * 4 * D + 2 * S * 3 * D * F + 2 * A * 4 * D)  # they need no weight gradient
    # layers whose input needs no gradient: the patch embedder, the timestep MLP's first, the head's first conv
    no_input_gradient = 2 * 16 * 768 * D + 2 * 256 * 1024 + 2 * 64 * 64 * 8 * 3 * 9
    # every other matmul and convolution: a weight and an input gradient, twice its forward; attention: 5 products
    backward = 2 * (forward - attention) - frozen - no_input_gradient + 5 * attention // 2
    for row in saved["training"]["rows"]:
        assert sum(row["flops_by_op"]["forward"].values()) == forward
        assert sum(row["flops_by_op"]["backward"].values()) == backward
        assert row["train_tflop_per_step"] * 1e12 == pytest.approx(size.train_batch * (forward + backward))


def test_flop_counter_counts_what_autograd_runs():
    """Trained and frozen linear layers, attention and convolutions, forward and backward, counted by hand. Autograd
    computes a weight's gradient where it trains and an input's where the input needs one; attention's backward is
    the five products torch counts (the scores recomputed, then four)."""
    torch.manual_seed(0)
    a, b, c = (torch.nn.Linear(i, o, bias=False) for i, o in ((8, 6), (6, 4), (4, 4)))
    frozen_conv, conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False), torch.nn.Conv2d(4, 1, 1, bias=False)
    b.requires_grad_(False)
    frozen_conv.requires_grad_(False)
    x, image = torch.randn(3, 8), torch.randn(1, 2, 5, 5)
    with speed.flop_counter() as forward:
        q = c(b(a(x))).view(1, 1, 3, 4)  # one head, 3 positions of 4 channels
        loss = torch.nn.functional.scaled_dot_product_attention(q, q, q).sum() + conv(frozen_conv(image)).sum()
    with speed.flop_counter() as backward:
        loss.backward()
    linear, product = {"a": 2 * 3 * 8 * 6, "b": 2 * 3 * 6 * 4, "c": 2 * 3 * 4 * 4}, 2 * 3 * 3 * 4
    convs = {"frozen": 2 * 5 * 5 * 4 * 2 * 3 * 3, "trained": 2 * 5 * 5 * 1 * 4}
    assert forward.get_total_flops() == sum(linear.values()) + 2 * product + sum(convs.values())
    # c: weight and input gradients; b (frozen): the input's; a: the weight's only (x needs none); the trained conv:
    # its weight's only; the frozen conv, whose input needs none, nothing
    assert backward.get_total_flops() == 2 * linear["c"] + linear["b"] + linear["a"] + 5 * product + convs["trained"]
