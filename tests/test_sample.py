"""sample.py on tiny models: sizes, determinism, CFG, released layout, the source side by side, errors."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import convert
import model
import sample
import train
from test_lift import align_images
from tiny import give_head_an_output, make_tiny_zimage_repo, save_single_file


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_zimage_repo(tmp_path_factory.mktemp("Z-Image-Turbo"))


@pytest.fixture(scope="module")
def ckpt(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("l2p") / "l2p-init.safetensors"
    convert.main(["--src", str(repo), "--out", str(out), "--recipe", "paper"])
    return give_head_an_output(out)


def run(ckpt, repo, out, *flags):
    sample.main(["--ckpt", str(ckpt), "--text-encoder", str(repo), "--out", str(out), "--steps", "2", *flags])


def pixels(path):
    return np.asarray(Image.open(path))


def test_size_seed_determinism_and_png_text(ckpt, repo, tmp_path):
    run(ckpt, repo, tmp_path / "a", "--prompt", "a red cube", "--width", "48", "--height", "32", "--num-images", "2",
        "--seed", "5")
    run(ckpt, repo, tmp_path / "b", "--prompt", "a red cube", "--width", "48", "--height", "32", "--seed", "5")
    first, second = tmp_path / "a" / "000_s5.png", tmp_path / "a" / "000_s6.png"
    assert Image.open(first).size == (48, 32)
    assert np.array_equal(pixels(first), pixels(tmp_path / "b" / "000_s5.png"))
    assert not np.array_equal(pixels(first), pixels(second))
    text = Image.open(first).text
    assert text["prompt"] == "a red cube" and text["seed"] == "5" and text["steps"] == "2" and text["cfg"] == "2.0"
    assert text["checkpoint"] == ckpt.name


def test_images_equal_the_shared_sampler_and_cfg_one_is_the_conditional_alone(ckpt, repo, tmp_path):
    run(ckpt, repo, tmp_path / "one.png", "--prompt", "two cats", "--res", "32", "--cfg", "1", "--seed", "3")
    run(ckpt, repo, tmp_path / "guided.png", "--prompt", "two cats", "--res", "32", "--seed", "3")
    encoder = model.load_text_encoder(repo, dtype=torch.float32)
    (cap, mask), (neg, neg_mask) = encoder.encode(["two cats"]), encoder.encode([""])
    dit = model.load_model(ckpt, dtype=torch.float32)
    alone = model.generate(dit, cap, mask, [3], 32, 32, steps=2, shift=3.0)
    guided = model.generate(dit, cap, mask, [3], 32, 32, steps=2, shift=3.0, guidance=2.0, neg_cap=neg,
                            neg_mask=neg_mask)
    assert np.array_equal(pixels(tmp_path / "one.png"), model.to_uint8(alone)[0])
    assert np.array_equal(pixels(tmp_path / "guided.png"), model.to_uint8(guided)[0])
    assert not np.array_equal(pixels(tmp_path / "one.png"), pixels(tmp_path / "guided.png"))


def test_released_1k_layout_with_mixed_dtypes_samples(ckpt, repo, tmp_path):
    state = load_file(str(ckpt))
    mixed = {k: v.float() if k.startswith("layers.1.") else v.to(torch.bfloat16) for k, v in state.items()}
    released = save_single_file(mixed, tmp_path / "model-1k-merge.safetensors")
    run(released, repo, tmp_path / "x.png", "--prompt", "p", "--res", "16", "--dtype", "bf16")
    assert Image.open(tmp_path / "x.png").size == (16, 16)


def test_latent_source_side_by_side(ckpt, repo, tmp_path):
    sample.main(["--ckpt", str(ckpt), "--latent", str(repo), "--prompt", "a", "--prompt", "b", "--res", "32",
                 "--steps", "2", "--latent-steps", "2", "--out", str(tmp_path)])
    for i in (0, 1):
        assert Image.open(tmp_path / f"00{i}_s0_latent.png").size == (32, 32)
        assert Image.open(tmp_path / f"00{i}_s0_compare.png").size == (64, 32)
        assert Image.open(tmp_path / f"00{i}_s0_latent.png").text["model"] == "latent source"


def test_defaults_follow_the_patch():
    args = sample.parse_args([])
    paper = lambda p: model.l2p_config(model.ZImageConfig(), p)
    assert sample.resolve_settings(args, paper(16)) == (1024, 1024, 30, 2.0, 3.0)
    assert sample.resolve_settings(args, paper(64)) == (4096, 4096, 50, 4.0, 3.0)
    assert sample.resolve_settings(args, None)[-1] == 3.0  # --latent alone


def test_a_lift_samples_with_its_sources_sampler(repo, tmp_path):
    """A lift's DiT is its source's: convert.py records the source's sampler from its repo (the tiny repo's scheduler
    is Turbo's: 8 steps, CFG off, shift 3; with base's shift 6: 50 steps, CFG 5), sample.py and train.py follow it."""
    base = tmp_path / "base"
    shutil.copytree(repo, base)
    scheduler = base / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 6.0}))
    images = align_images(tmp_path / "images")
    for source, expected in ((repo, (8, 1.0, 3.0)), (base, (50, 5.0, 6.0))):
        out = tmp_path / f"{source.name}.safetensors"
        convert.main(["--src", str(source), "--out", str(out), "--head-width", "16", "--head-steps", "0",
                      "--align-data", str(images)])
        cfg = model.open_checkpoint(out).cfg
        assert cfg.source_sampler == expected and model.pixel_shift(cfg, 64 * 64, 30) == expected[2]
        assert sample.resolve_settings(sample.parse_args([]), cfg)[2:] == expected
        assert sample.resolve_settings(sample.parse_args(["--steps", "5", "--cfg", "2.5", "--shift", "4"]), cfg)[
            2:] == (5, 2.5, 4.0)
        args = train.parse_args(["--plan-only"])  # train.py's sample grids too
        train.recipe_defaults(args, cfg)
        assert (args.sample_steps, args.sample_guidance) == expected[:2]
    # the transformer/ folder of a repo, or a file in it (also one linked into a Hugging Face cache's blobs/), finds
    # the repo root; a file anywhere else gets the released defaults
    alone = tmp_path / "alone" / "z_image.safetensors"
    alone.parent.mkdir()
    shutil.copy(next((base / "transformer").glob("*.safetensors")), alone)
    snapshot, blobs = tmp_path / "hub" / "snapshots" / "0123", tmp_path / "hub" / "blobs"
    for i, file in enumerate(sorted(f for f in base.rglob("*") if f.is_file())):
        blobs.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, blobs / str(i))
        (snapshot / file.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / file.relative_to(base)).symlink_to(blobs / str(i))
    linked = next((snapshot / "transformer").glob("*.safetensors"))
    for source, expected in ((base / "transformer", (50, 5.0, 6.0)), (linked, (50, 5.0, 6.0)), (alone, ())):
        out = tmp_path / f"{source.name}.safetensors"
        convert.main(["--src", str(source), "--vae", str(repo), "--out", str(out), "--head-width", "16",
                      "--head-steps", "0", "--align-data", str(images)])
        cfg = model.open_checkpoint(out).cfg
        assert cfg.source_sampler == expected
    assert sample.resolve_settings(sample.parse_args([]), cfg)[2:] == (30, 2.0, 3.0)


@pytest.mark.parametrize("source", [model.ZImageConfig(), model.Flux2Config()], ids=["zimage", "flux2"])
def test_a_lifted_model_at_2k_and_4k_gives_its_dit_the_noise_levels_of_1k(source):
    """The DiT of a lift extended by f = p / 16 reads sigma' = sigma / (f s + (1 - f s) sigma) (PixelLift.dit_input):
    the default shift makes that the 1K model's sequence, step for step."""
    s, steps = 0.8, 30
    dit_sigmas = lambda cfg, lift_scale: [sigma / (lift_scale + (1 - lift_scale) * sigma) for sigma in
                                          model.shifted_sigmas(steps, model.pixel_shift(cfg, 64 * 64, steps)).tolist()]
    at_1k = dit_sigmas(model.l2p_config(source, 16, recipe="lift"), s)
    for factor in (2, 4):
        lifted = model.l2p_config(source, 16 * factor, recipe="lift")
        _, scale = model.extend_lift(torch.zeros(1, 16 * 16 * 3), torch.tensor(s), factor)
        assert dit_sigmas(lifted, scale.item()) == pytest.approx(at_1k, rel=1e-6, abs=1e-9)
        args = sample.parse_args(["--res", str(1024 * factor)])
        at_1k_shift = 3.0 if source.family == "zimage" else math.exp(model.compute_empirical_mu(64 * 64, 50))
        assert sample.resolve_settings(args, lifted)[-1] == pytest.approx(factor * at_1k_shift)  # FLUX.2: 50 steps
    assert model.pixel_shift(model.l2p_config(source, 64), 64 * 64, steps) == model.pixel_shift(
        model.l2p_config(source, 16), 64 * 64, steps)  # the paper's recipe keeps its shift at 4K


def test_clear_errors(ckpt, repo, tmp_path, capsys):
    with pytest.raises(SystemExit, match="not a multiple of the model's 16-pixel patch"):
        run(ckpt, repo, tmp_path, "--prompt", "p", "--width", "40", "--height", "32")
    with pytest.raises(SystemExit, match="needs the Qwen3 text encoder"):
        sample.main(["--ckpt", str(ckpt), "--prompt", "p"])
    with pytest.raises(SystemExit, match="is a latent transformer"):
        run(repo, repo, tmp_path, "--prompt", "p")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no prompt"):
        run(ckpt, repo, tmp_path, "--prompts", str(tmp_path / "empty.txt"))
    sample.resolve_settings(sample.parse_args(["--res", "4096"]), model.l2p_config(model.ZImageConfig(), 16))
    assert "65,536 tokens" in capsys.readouterr().out


def test_train_py_sample_grids_use_sample_py_defaults():
    """train.py's sample grids sample as sample.py does by default: the released sampler by patch and family, a
    lift's source's, with the shift for those steps (FLUX.2's exp(mu) depends on them)."""
    zimage, klein = model.ZImageConfig(), model.Flux2Config()
    models = {"zimage 1k": model.l2p_config(zimage), "zimage 4k": model.l2p_config(zimage, 64),
              "klein": model.l2p_config(klein),
              "klein lift, distilled": replace(model.l2p_config(klein, recipe="lift"), source_sampler=(4, 1.0, 0))}
    expected = {"zimage 1k": (30, 2.0, 3.0), "zimage 4k": (50, 4.0, 3.0), "klein": (50, 4.0), "klein lift, distilled":
                (4, 1.0)}
    for name, cfg in models.items():
        args = train.parse_args(["--plan-only", "--res", str(64 * cfg.patch_size)])
        train.recipe_defaults(args, cfg)
        grid = args.sample_steps, args.sample_guidance, args.sample_shift
        assert grid == sample.resolve_settings(sample.parse_args([]), cfg)[2:], name
        assert grid[:len(expected[name])] == expected[name], name
    assert args.sample_shift == math.exp(model.compute_empirical_mu(64 * 64, 4))  # the distilled lift's, 4 steps
