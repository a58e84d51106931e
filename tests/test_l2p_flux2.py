"""L2P from an MMDiT: the pixel FLUX.2 [klein] model through convert.py, train.py and sample.py on a tiny klein repo,
and its real-size layout on the meta device."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2
from PIL import Image
from safetensors.torch import load_file

import convert
import model
import sample
import train
from test_train import first_source_states, free_port, log_rows, losses, picture, updates_differ
from tiny import TINY_FLUX2_VAE, make_tiny_klein_repo, read_format

ROOT = Path(__file__).resolve().parents[1]
CAP_DIM = 3 * 64  # FLUX.2's features: 3 hidden states of the tiny Qwen3 side by side
TINY = ["--device", "cpu", "--workers", "0", "--res", "32", "--train-blocks", "1", "--sample-every", "0",
        "--log-every", "1", "--warmup", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_klein_repo(tmp_path_factory.mktemp("FLUX.2-klein-base"), distilled=False)


@pytest.fixture(scope="module")
def init(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("l2p") / "l2p-klein-init.safetensors"
    convert.main(["--src", str(repo), "--out", str(out), "--head-width", "16", "--tail-modulation", "1",
                  "--recipe", "paper"])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    g, rows = torch.Generator().manual_seed(0), []
    for i in range(4):
        picture(i).save(folder / f"{i}.png")
        cap = torch.randn(8, CAP_DIM, generator=g)  # the real ones are 512 x 7680
        model.write_caption_features(model.caption_features_path(folder, f"p{i}"), cap, f"p{i}")
        rows.append({"file_name": f"{i}.png", "prompt": f"p{i}",
                     "features": model.caption_features_path(folder, f"p{i}").name})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ---- real size, meta device ----

def params(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def test_real_size_pixel_klein_layout_and_freeze_policy():
    with torch.device("meta"):
        net = model.new_model(model.l2p_config(model.Flux2Config(), 16))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == read_format("l2p-flux2-klein-1k")  # committed beside the published tables
    latent = read_format("flux2-klein-4b-transformer")
    dropped = {"x_embedder.weight", "norm_out.linear.weight", "proj_out.weight"}
    assert {k: s for k, s in latent.items() if k not in dropped} == {k: s for k, s in shapes.items() if k in latent}
    assert set(shapes) - set(latent) == {"pixel_embedder.weight"} | {k for k in shapes if k.startswith("local_decoder.")}
    assert params(shapes) == 3_867_934_979  # ../shared/FLUX2.md 6.3, counted apart from model.py
    assert model.set_trainable(net, 5) == (1_989_145_091, 1_878_789_888)
    assert model.set_trainable(net, 5, strict=True)[0] == 1_965_552_131
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"single_transformer_blocks", "single_stream_modulation", "time_guidance_embed",
                      "context_embedder"}  # strict: the caption embedder too
    # patch 64: the 4K head, two more levels; its bottleneck reads 3072 token channels instead of Z-Image's 3840
    with torch.device("meta"):
        net = model.new_model(model.l2p_config(model.Flux2Config(), 64))
    head_4k = params({k: s for k, s in read_format("l2p-4k").items() if k.startswith("local_decoder.")})
    expected = params(latent) - params({k: latent[k] for k in dropped}) + 64 * 64 * 3 * 3072 + head_4k - 512 * 768
    assert sum(p.numel() for p in net.parameters()) == expected


# ---- convert.py ----

def test_convert_copies_every_backbone_tensor_and_creates_only_the_embedder_and_head(repo, init):
    source = dict(model.read_tensors(model.safetensors_files(repo / "transformer")))
    out = load_file(str(init))
    created = {k for k in out if k.startswith(("pixel_embedder.", "local_decoder."))}
    tail = "single_stream_modulation_tail.1.linear.weight"
    assert set(out) - set(source) == created | {tail}
    assert set(source) - set(out) == {"x_embedder.weight", "norm_out.linear.weight", "proj_out.weight"}
    assert all(torch.equal(out[k], source[k]) for k in source if k in out)  # bit for bit
    assert torch.equal(out[tail], source["single_stream_modulation.linear.weight"])  # the tail's copy starts equal
    assert out["pixel_embedder.weight"].shape == (32, 16 * 16 * 3) and "pixel_embedder.bias" not in out
    cfg = model.open_checkpoint(init).cfg
    assert (cfg.pixel_head, cfg.patch_size, cfg.in_channels, cfg.head_width, cfg.single_tail) == (True, 16, 3, 16, 1)


# ---- the pixel model ----

@pytest.mark.parametrize("patch,size", [(16, (32, 32)), (16, (32, 48)), (64, (128, 64))])
def test_pixel_model_any_size_and_batch_equals_one_by_one(repo, patch, size):
    torch.manual_seed(0)
    cfg = model.l2p_config(model.open_checkpoint(repo).cfg, patch, head_width=8)
    net = model.new_model(cfg).eval()
    torch.nn.init.normal_(net.local_decoder.out_conv.weight, std=0.1)  # a fresh head predicts 0: give it an output
    x, sigma = torch.rand(2, 3, *size) * 2 - 1, torch.tensor([0.3, 0.9])
    cap, mask = torch.randn(2, 8, CAP_DIM), torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        both = net(x, sigma, cap, mask)
        alone = torch.cat([net(x[i:i + 1], sigma[i:i + 1], cap[i:i + 1], mask[i:i + 1]) for i in range(2)])
    assert both.shape == x.shape and both.abs().mean() > 0
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of the patch"):
        net(torch.zeros(1, 3, size[0] + 8, size[1]), sigma[:1], cap[:1], mask[:1])


# ---- train.py ----

def test_training_moves_only_the_policy_and_keeps_the_shared_modulation(init, data, tmp_path):
    out = tmp_path / "run"
    train.main(["--init", str(init), "--data", str(data), "--out", str(out), *TINY, "--max-steps", "3", "--lr", "1e-3"])
    assert all(np.isfinite(list(losses(out).values())))
    trained = load_file(str(out / "trained.safetensors"))
    with torch.device("meta"):
        policy = model.new_model(model.open_checkpoint(init).cfg)
    model.set_trainable(policy, 1)
    assert set(trained) == {n for n, p in policy.named_parameters() if p.requires_grad}
    # 1 + 1 of 3 blocks train: the double block and single 1, which reads the tail's modulation; single 0 is frozen
    assert "single_stream_modulation_tail.1.linear.weight" in trained
    assert not any(k.startswith(("single_stream_modulation.", "single_transformer_blocks.0.", "time_guidance_embed."))
                   for k in trained)
    start, loaded = load_file(str(init)), model.load_model(out / "trained.safetensors", dtype=torch.float32)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], start[k].float()) for k in start if k not in trained)
    assert all(not torch.equal(state[k], start[k].float()) for k in trained)
    start = log_rows(out, "start")[0]  # trained on the sigmas klein-base samples with at 32^2: 4 tokens, 50 steps
    assert start["shift"] == pytest.approx(np.exp(model.compute_empirical_mu(4, 50))) and start["dtype"] == "fp32"


def test_a_lifted_init_trains_on_its_samplers_states(repo, data, tmp_path, monkeypatch):
    """The tiny VAE's token is 4 x 4 pixels, so the lift is extended to the 16-pixel patch (as at 4K): the states
    train.py makes encode each image area-downsampled to the patch grid, one latent token per patch."""
    init = tmp_path / "lift.safetensors"
    convert.main(["--src", str(repo), "--out", str(init), "--head-width", "16", "--head-steps", "0",
                  "--align-data", str(data)])
    assert model.open_checkpoint(init).cfg.source_sampler == (50, 4.0, 0)  # klein-base's: its shift is exp(mu)
    calls, forward = [], model.Flux2DiT.forward

    def recording(self, x, sigma, cap, cap_mask, **kwargs):
        if self.training:
            calls.append((x.detach().clone(), sigma.clone()))
        return forward(self, x, sigma, cap, cap_mask, **kwargs)

    monkeypatch.setattr(model.Flux2DiT, "forward", recording)
    train.main(["--init", str(init), "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1",
                "--vae", str(repo)])
    AutoencoderKLFlux2(**{**TINY_FLUX2_VAE, "latent_channels": 8}).save_pretrained(tmp_path / "vae-8")
    with pytest.raises(model.CheckpointError, match="its latent tokens hold 32 values, the source DiT reads 16"):
        train.main(["--init", str(init), "--data", str(data), "--out", str(tmp_path / "other"), *TINY, "--max-steps",
                    "1", "--vae", str(tmp_path / "vae-8")])
    (x, sigma), = calls
    # [B, 4, 16]: one 4-channel x 2 x 2 latent token per 16 x 16 patch, encoded from its 8 x 8 pixels
    expected, _, _ = first_source_states(init, data, repo, sigma, lambda vae, x0: model.patchify(
        vae.encode(torch.nn.functional.avg_pool2d(x0, 4)), 1))
    assert ((x.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_two_gloo_processes_train_as_one(init, data, tmp_path):
    common = ["--init", str(init), "--data", str(data), *TINY, "--max-steps", "3", "--lr", "1e-3"]
    train.main([*common, "--out", str(tmp_path / "single")])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "train.py", *common, "--out", str(tmp_path / "double"),
                               "--micro-batch", "1"], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    a, b = losses(tmp_path / "single"), losses(tmp_path / "double")
    assert np.allclose(list(a.values()), list(b.values()), rtol=1e-5)
    norms = [list(losses(tmp_path / d, "grad_norm").values()) for d in ("single", "double")]
    assert np.allclose(*norms, rtol=1e-4)
    assert updates_differ(tmp_path / "single", tmp_path / "double", init) < 1e-2


# ---- sample.py ----

def test_sample_writes_the_size_asked_deterministically_and_refuses_bad_input(repo, init, tmp_path):
    args = ["--ckpt", str(init), "--text-encoder", str(repo), "--prompt", "a cat", "--steps", "2", "--device", "cpu"]
    sample.main([*args, "--width", "48", "--height", "32", "--out", str(tmp_path / "a.png")])
    sample.main([*args, "--width", "48", "--height", "32", "--out", str(tmp_path / "b.png")])
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert a.shape == (32, 48, 3) and np.array_equal(a, b)
    text = Image.open(tmp_path / "a.png").text
    assert float(text["cfg"]) == 4.0 and float(text["shift"]) == pytest.approx(
        np.exp(model.compute_empirical_mu(6, 2)))  # klein-base's sampler: CFG 4, exp(mu) of 2 x 3 tokens
    with pytest.raises(SystemExit, match="not a multiple of the model's 16-pixel patch"):
        sample.main([*args, "--res", "40", "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="is a latent transformer"):
        sample.main([*args[:1], str(repo), *args[2:], "--out", str(tmp_path / "d.png")])


def test_the_head_reads_the_tokens_layernorm_when_the_file_says_so(repo, init, tmp_path):
    """convert.py --head-tokens norm is recorded in the file, and the head then reads the parameter-free LayerNorm of
    the last single block's image tokens (what norm_out applies); a file without it reads the raw tokens."""
    out = tmp_path / "norm.safetensors"
    convert.main(["--src", str(repo), "--out", str(out), "--head-width", "16", "--recipe", "paper", "--head-tokens",
                  "norm"])
    net = model.load_model(out, dtype=torch.float32)
    assert net.cfg.head_token_norm and not model.load_model(init, dtype=torch.float32).cfg.head_token_norm
    torch.nn.init.normal_(net.local_decoder.out_conv.weight, std=0.1)  # a fresh head's output conv is zero
    g = torch.Generator().manual_seed(0)
    x, cap, sigma = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 7, CAP_DIM, generator=g), \
        torch.tensor([0.8, 0.3])
    with torch.no_grad():
        hidden, _ = net.transformer(model.patchify(x, 16), (2, 2), sigma, cap)
        tokens = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:], eps=1e-6)
        assert torch.equal(net(x, sigma, cap), net.local_decoder(x, tokens.transpose(1, 2).unflatten(2, (2, 2))))
