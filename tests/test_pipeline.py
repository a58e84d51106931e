"""Text -> DiT steps -> VAE decode, end to end, against diffusers' ZImagePipeline given the same initial noise."""

import pytest
import torch

import model
from tiny import make_tiny_zimage_repo

PROMPTS = ["a red cube on a table", "two cats"]
SEEDS = [11, 12]
H, W = 64, 96  # latent 8 x 12, 4 x 6 tokens: not a multiple of 32, non-square


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_zimage_repo(tmp_path_factory.mktemp("Z-Image-Turbo"))


@pytest.fixture(scope="module")
def reference(repo):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=AutoencoderKL.from_pretrained(repo / "vae"),
        text_encoder=Qwen3Model.from_pretrained(repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(repo / "tokenizer"),
        transformer=ZImageTransformer2DModel.from_pretrained(repo / "transformer"))


@pytest.fixture(scope="module")
def ours(repo):
    return (model.load_model(repo, dtype=torch.float32), model.load_vae(repo),
            model.load_text_encoder(repo, dtype=torch.float32))


def test_shifted_sigmas_equal_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps, shift in ((8, 3.0), (50, 6.0)):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
        assert torch.allclose(model.shifted_sigmas(steps, shift), scheduler.sigmas, atol=1e-6)


@pytest.mark.parametrize("steps,w", [(8, 0.0), (4, 3.0)])  # Turbo: 8 steps, no CFG; base-style CFG w = 3
def test_generation_matches_zimage_pipeline(repo, reference, ours, steps, w):
    dit, vae, text = ours
    cap, mask = text.encode(PROMPTS)
    neg, neg_mask = text.encode([""] * len(PROMPTS))
    images = model.generate(dit, cap, mask, SEEDS, H, W, steps=steps, shift=3.0, guidance=1 + w, neg_cap=neg,
                            neg_mask=neg_mask, vae=vae)
    noise = model.noise_for_seeds(SEEDS, (16, H // 8, W // 8))
    expected = reference(prompt=PROMPTS, height=H, width=W, num_inference_steps=steps, guidance_scale=w,
                         latents=noise, output_type="pt").images  # [0, 1]
    assert images.shape == (2, 3, H, W)
    assert rel((images / 2 + 0.5).clamp(0, 1), expected) < 1e-4


def test_cfg_in_two_passes_equals_one_batch_and_guidance_one_is_the_conditional_alone(ours):
    dit, _, text = ours
    cap, mask = text.encode(PROMPTS)
    neg, neg_mask = text.encode(["", ""])
    noise = model.noise_for_seeds(SEEDS, (16, 8, 12))
    batched = model.sample(dit, noise, cap, mask, 3, 3.0, 2.5, neg, neg_mask, cfg_batch=True)
    two_pass = model.sample(dit, noise, cap, mask, 3, 3.0, 2.5, neg, neg_mask, cfg_batch=False)
    assert rel(batched, two_pass) < 1e-5
    unguided = model.sample(dit, noise, cap, mask, 3, 3.0, 1.0, neg, neg_mask)
    assert torch.equal(unguided, model.sample(dit, noise, cap, mask, 3, 3.0))
    assert rel(unguided, batched) > 1e-3


def test_noise_depends_on_the_seed_only():
    a = model.noise_for_seeds([1, 2, 3], (3, 4, 4))
    assert torch.equal(a[1:2], model.noise_for_seeds([2], (3, 4, 4))) and not torch.equal(a[0], a[1])


def test_generate_refuses_bad_sizes_and_missing_vae(ours):
    dit, vae, text = ours
    cap, mask = text.encode(PROMPTS[:1])
    with pytest.raises(ValueError, match="multiples of 16"):
        model.generate(dit, cap, mask, [0], 72, 64, steps=1, shift=3.0, vae=vae)
    with pytest.raises(ValueError, match="needs its VAE"):
        model.generate(dit, cap, mask, [0], 64, 64, steps=1, shift=3.0)
