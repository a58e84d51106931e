"""The latent-aligned conversion (convert.py --recipe lift): the Procrustes fit, its extension to larger patches, the
lifted pixel model at step 0 against the source in closed form (both families), the recipes' layouts at real size,
and the paper's recipe unchanged."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import convert
import model
from tiny import make_diffusers_dit, make_flux2_vae, make_tiny_klein_repo, read_format
from tiny_vae import TINY_VAE_CONFIG, save_tiny_vae


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def planted(d=64, P=768, scale=0.7, seed=0, n=4000):
    """Pixel patches x that are s basis^T z for latent tokens z of unequal spread: x = s basis^T z exactly."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(P, d, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    return basis, scale, scale * z @ basis, z


def test_fit_recovers_a_planted_orthonormal_map_and_scale():
    basis, scale, x, z = planted()
    fitted, s, fit = model.fit_lift((x[i:i + 700], z[i:i + 700]) for i in range(0, len(x), 700))
    assert rel(fitted, basis) < 1e-5 and abs(s.item() - scale) / scale < 1e-5
    assert fit["latent_energy_unexplained"] < 1e-8 and abs(fit["pixel_energy_in_subspace"] - 1) < 1e-8
    # pixel detail outside the subspace and noise on the latents: the map is still found, and the fit reports the
    # share of the pixel energy outside and of the latent energy it leaves unexplained
    basis, scale, x, z = planted(n=20000)
    g = torch.Generator().manual_seed(1)
    detail = torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std() / 3
    detail -= detail @ basis.T @ basis
    noisy = z + 0.3 * z.std() * torch.randn(z.shape, generator=g, dtype=torch.float64)
    fitted, s, fit = model.fit_lift([(x + detail, noisy)])
    assert rel(fitted, basis) < 0.1 and 0.05 < fit["latent_energy_unexplained"] < 0.2
    inside = (x.square().sum() / (x + detail).square().sum()).item()  # the planted basis holds x, not the detail
    assert abs(fit["pixel_energy_in_subspace"] - inside) < 0.01


def test_extended_lift_is_the_fit_on_the_area_downsampled_image():
    basis, scale, _, _ = planted(d=16, P=4 * 4 * 3, n=1)
    big, s2 = model.extend_lift(basis.float(), torch.tensor(scale), 2)
    assert big.shape == (16, 8 * 8 * 3) and abs(s2.item() - 2 * scale) < 1e-6
    assert torch.allclose(big @ big.T, torch.eye(16), atol=1e-6)  # still orthonormal: noise stays unit noise
    x = torch.randn(3, 3, 16, 16)
    small = torch.nn.functional.avg_pool2d(x, 2)
    lhs = model.patchify(x, 8) @ big.T
    rhs = 2 * model.patchify(small, 4) @ basis.float().T
    assert rel(lhs, rhs) < 1e-6


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_training_states_of_an_extended_lift_are_the_fitted_ones_upsampled(family, tmp_path):
    """train.py --states source at 2K / 4K: the VAE encodes the image area-downsampled to its token grid, so on a 2x
    nearest-upsampled image the extended lift's state is the fitted lift's state, upsampled."""
    if family == "zimage":
        save_tiny_vae(tmp_path)
    else:
        make_flux2_vae().save_pretrained(tmp_path)
    vae = model.load_vae(tmp_path, dtype=torch.float32)
    token = vae.downscale * model.latent_token_patch(vae)  # 16 (FLUX.1's x8, 2 x 2) or 4 (the tiny FLUX.2 VAE)
    d = 4 * vae.cfg.latent_channels  # 2 x 2 latent positions (Z-Image) or 2 x 2 packed into channels (FLUX.2)
    model.check_vae_fits(vae, d, "--vae")
    with pytest.raises(model.CheckpointError, match="its latent tokens hold"):
        model.check_vae_fits(vae, 2 * d, "--vae")
    basis, scale, _, _ = planted(d=d, P=token * token * 3, n=1)
    fitted, extended = model.PixelLift(d, token * token * 3), model.PixelLift(d, 4 * token * token * 3)
    fitted.basis.copy_(basis)
    fitted.scale.fill_(scale)
    extended.basis, extended.scale = model.extend_lift(basis.float(), torch.tensor(scale), 2)
    x = torch.rand(2, 3, 2 * token, 3 * token, generator=torch.Generator().manual_seed(0)) * 2 - 1
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")
    with torch.no_grad():
        assert rel(extended.source_image(up(x), vae, 2 * token), up(fitted.source_image(x, vae, token))) < 1e-5
        # any image: its 2 x 2 pixel means are what the VAE encodes (a strided subsample would pass the check above)
        big, b = up(x) + 0.2 * torch.randn(up(x).shape, generator=torch.Generator().manual_seed(1)), basis.double()
        latent = model.latent_tokens(vae, torch.nn.functional.avg_pool2d(big, 2)).double()
        patches = model.patchify(big.double(), 2 * token)
        # lifted back: 2 s times latent @ (the fit's basis, each pixel a 2 x 2 block, halved)
        lifted = scale * (latent @ b).view(-1, token, 1, token, 1, 3).expand(-1, token, 2, token, 2, 3)
        in_span = patches @ extended.basis.double().T @ extended.basis.double()
        hand = model.unpatchify(lifted.reshape(patches.shape) + patches - in_span, 2 * token, *big.shape[2:])
        assert rel(extended.source_image(big, vae, 2 * token), hand) < 1e-5


# ---- the lifted model at step 0, through convert.py, on tiny repos of both families ----

def align_images(folder: Path, n: int = 6, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth random images: a few blurred blobs of colour
        img = rng.normal(size=(size // 8, size // 8, 3))
        Image.fromarray(np.uint8(np.clip(128 + 60 * np.kron(img, np.ones((8, 8, 1))), 0, 255))).save(
            folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def zimage_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("Z-Image")
    make_diffusers_dit().save_pretrained(root / "transformer")
    save_tiny_vae(root / "vae")
    return root


def test_head_steps_keep_a_window_of_each_align_image(zimage_repo, tmp_path, monkeypatch):
    """Of each align image the head's steps keep a random window (at 4K the whole images would not fit in memory)
    with its own latent tokens; the fit itself reads the whole images."""
    images = align_images(tmp_path / "images", n=convert.ALIGN_BATCH + 3, size=96)  # more than one VAE batch
    args = convert.parse_args(["--src", str(zimage_repo), "--out", str(tmp_path / "x.safetensors"),
                               "--align-data", str(images)])
    latent_dim = 4 * model.open_checkpoint(zimage_repo).cfg.in_channels
    basis, scale, _, whole = convert.fit_to_source(args, zimage_repo, "zimage", latent_dim)
    monkeypatch.setattr(convert, "HEAD_WINDOW_PIXELS", 32)
    monkeypatch.setattr(convert, "HEAD_CROP_TOKENS", 1)
    basis_w, scale_w, _, windows = convert.fit_to_source(args, zimage_repo, "zimage", latent_dim)
    assert torch.equal(basis, basis_w) and torch.equal(scale, scale_w)
    corners = set()
    for (image, tokens), (window, window_tokens) in zip(whole, windows):
        assert image.shape == (3, 96, 96) and window.shape == (3, 32, 32) and window_tokens.shape[:2] == (2, 2)
        r, c = next((r, c) for r in range(5) for c in range(5)
                    if torch.equal(image[:, 16 * r:16 * r + 32, 16 * c:16 * c + 32], window))
        assert torch.equal(tokens[r:r + 2, c:c + 2], window_tokens)
        corners.add((r, c))
    assert len(corners) > 1  # random windows, not one corner


def closed_form_lift(source, lift_basis, lift_scale, x, sigma, cap, mask, latent_patch, p):
    """The source's own prediction on the projected input, lifted back: written out from the construction."""
    B, _, H, W = x.shape
    s = lift_scale.double()
    k = 1 / (s + (1 - s) * sigma.double())
    t = H // p * latent_patch  # latent positions per side
    z_in = model.unpatchify((model.patchify(x.double() * k.view(-1, 1, 1, 1), p) @ lift_basis.double().T).float(),
                            latent_patch, t, W // p * latent_patch)
    v_latent = source(z_in, (k * sigma).float(), cap, mask).double()
    z0 = z_in.double() - (k * sigma).view(-1, 1, 1, 1) * v_latent
    x0 = model.unpatchify(s * model.patchify(z0, latent_patch) @ lift_basis.double(), p, H, W)
    return (x.double() - x0) / sigma.double().clamp_min(model.X0_MIN_SIGMA).view(-1, 1, 1, 1)


def test_lifted_zimage_at_step_0_is_the_source_in_closed_form(zimage_repo, tmp_path):
    out = tmp_path / "lift.safetensors"
    convert.main(["--src", str(zimage_repo), "--out", str(out), "--head-width", "16", "--head-steps", "0",
                  "--align-data", str(align_images(tmp_path / "images"))])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["l2p_recipe"] == "lift" and meta["align_images"] == "6"
    net = model.load_model(out, dtype=torch.float32)
    assert net.cfg.lift_dim == 64 and net.cfg.x_prediction and net.cfg.head_sigma and net.cfg.head_lift
    source = model.load_model(zimage_repo, dtype=torch.float32)
    # the kept final layer is the source's, bit for bit; the embedder is the source's read through the basis
    assert torch.equal(net.all_final_layer["2-1"].linear.weight, source.all_final_layer["2-1"].linear.weight)
    assert rel(net.all_x_embedder["16-1"].weight, source.all_x_embedder["2-1"].weight @ net.lift.basis) < 1e-6
    assert torch.allclose(net.lift.basis @ net.lift.basis.T, torch.eye(64), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    x, cap = torch.randn(2, 3, 32, 48, generator=g), torch.randn(2, 7, 24, generator=g)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    for sigma in (torch.tensor([0.9, 0.3]), torch.tensor([1.0, 0.02])):
        with torch.no_grad():
            ours, reference = net(x, sigma, cap, mask), closed_form_lift(source, net.lift.basis, net.lift.scale, x,
                                                                         sigma, cap, mask, 2, 16)
        assert rel(ours, reference) < 1e-5
    # a run's checkpoint over this init merges into one file that keeps the recipe (a stand-in for train.py's)
    trained = {k: v + 0.01 for k, v in load_file(str(out)).items() if k.startswith("local_decoder.")}
    run = tmp_path / "trained.safetensors"
    model.write_safetensors(run, trained, model.trained_metadata(out, run))
    convert.main(["--src", str(run), "--out", str(tmp_path / "merged.safetensors"), "--dtype", "bf16"])
    merged = model.load_model(tmp_path / "merged.safetensors", dtype=torch.float32)
    assert merged.cfg == net.cfg and merged.lift.basis.dtype == torch.float32
    recorded = {k: v for k, v in model.safetensors_metadata(out).items() if k != "dtype"}  # the init's record too
    assert recorded.items() < model.safetensors_metadata(tmp_path / "merged.safetensors").items()
    assert torch.equal(merged.lift.basis, net.lift.basis)
    # guards the test: a head that is not zero moves v away from the source's (while sigma > 0, by the part of its
    # output outside the basis's span: a constant colour would be mostly inside)
    with torch.no_grad():
        net.local_decoder.out_conv.weight.normal_(std=0.1, generator=g)
        assert rel(net(x, sigma, cap, mask), reference) > 1e-3


def test_lifted_klein_at_step_0_is_the_source_in_closed_form(tmp_path_factory, tmp_path):
    repo = make_tiny_klein_repo(tmp_path_factory.mktemp("klein"), distilled=False, text_layers=3)
    out = tmp_path / "lift.safetensors"
    convert.main(["--src", str(repo), "--out", str(out), "--head-width", "16", "--head-steps", "0",
                  "--align-data", str(align_images(tmp_path / "images"))])
    net = model.load_model(out, dtype=torch.float32)
    source = model.load_model(repo, dtype=torch.float32)
    assert net.cfg.lift_dim == source.cfg.in_channels and torch.equal(net.proj_out.weight, source.proj_out.weight)
    # the tiny VAE's token is 4 x 4 pixels: the lift was fitted there and extended to 16 x 16 (area downsample)
    latent_patch = 1
    g = torch.Generator().manual_seed(0)
    x, cap = torch.randn(2, 3, 32, 48, generator=g), torch.randn(2, 5, source.cfg.joint_attention_dim, generator=g)
    sigma = torch.tensor([0.8, 0.1])
    with torch.no_grad():
        ours = net(x, sigma, cap, None)
        reference = closed_form_lift(source, net.lift.basis, net.lift.scale, x, sigma, cap, None, latent_patch, 16)
    assert rel(ours, reference) < 1e-5


def test_head_steps_teach_the_head_to_decode_the_lifted_latents(zimage_repo, tmp_path):
    images = align_images(tmp_path / "images")
    nets = {}
    for steps in (0, 60):
        out = tmp_path / f"head{steps}.safetensors"
        convert.main(["--src", str(zimage_repo), "--out", str(out), "--head-width", "16", "--head-steps", str(steps),
                      "--head-batch", "4", "--align-data", str(images)])
        nets[steps] = model.load_model(out, dtype=torch.float32)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["head_steps"] == "60"
    net, start = nets[60], nets[0]
    assert torch.equal(net.lift.basis, start.lift.basis)  # the same fit; only the head moved
    # its error on the align images, from the source's VAE: the lifted latent L = s basis^T z, the noisy state the
    # sampler holds, and the head on a zero token map; a zero head leaves the lift's own error ||L - x0||
    vae = model.load_vae(zimage_repo / "vae", dtype=torch.float32)
    x0 = torch.cat([torch.from_numpy(np.array(Image.open(images / f"{i}.png"))).permute(2, 0, 1)[None]
                    for i in range(6)]).float() / 127.5 - 1
    g = torch.Generator().manual_seed(1)
    errors = {}
    with torch.no_grad():
        lifted = model.unpatchify(net.lift.to_pixels(model.latent_tokens(vae, x0)), 16, 64, 64)
        for steps, candidate in nets.items():
            errors[steps] = 0.0
            for s in (0.05, 0.3, 0.6, 0.9):
                sigma = torch.full((6,), s)
                state = (1 - s) * lifted + s * torch.randn(lifted.shape, generator=g)
                zero_tokens = torch.zeros(6, net.cfg.dim, 4, 4)
                head = candidate.local_decoder(model.head_input(state, lifted, sigma), zero_tokens)
                errors[steps] += (lifted + head - x0).square().mean().item()
    assert errors[60] < 0.8 * errors[0]
    # the DiT's tokens do not reach the head yet (their bottleneck weights are zero): the converted model is the
    # lifted source plus the head on a zero token map, the head's part inside the basis's span withheld while
    # sigma > 0 (the DiT reads that span) and added at sigma = 0
    x, cap = torch.randn(2, 3, 32, 48, generator=g), torch.randn(2, 7, 24, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    basis = net.lift.basis.double()
    source = model.load_model(zimage_repo, dtype=torch.float32)
    for sigma in (torch.tensor([0.9, 0.3]), torch.tensor([0.0, 0.0])):
        with torch.no_grad():
            v_source = closed_form_lift(source, net.lift.basis, net.lift.scale, x, sigma, cap, mask, 2, 16)
            clamped = sigma.double().clamp_min(model.X0_MIN_SIGMA).view(-1, 1, 1, 1)
            lifted_x0 = x.double() - clamped * v_source
            head = net.local_decoder(model.head_input(x, lifted_x0.float(), sigma), torch.zeros(2, net.cfg.dim, 2, 3))
            head = head.double()
            in_span = model.unpatchify(model.patchify(head, 16) @ basis.T @ basis, 16, 32, 48)
            detail = head - in_span if sigma.max() > 0 else head
            reference = (x.double() - lifted_x0 - detail) / clamped
            assert rel(net(x, sigma, cap, mask), reference) < 1e-5
            assert rel(in_span, torch.zeros_like(in_span)) > 0.1  # the taught head does reach into the span
    # the sampler's last call, at sigma = 0 on the final state, is the only one with that part
    noise = model.noise_for_seeds([0, 1], (3, 32, 48))
    with torch.no_grad():
        sampled = model.sample(net, noise, cap, mask, 3, 3.0)
        euler = noise.clone()
        grid = model.shifted_sigmas(3, 3.0)
        for i in range(3):
            euler = euler + (grid[i + 1] - grid[i]) * net(euler, grid[i].expand(2), cap, mask)
        finished = euler - model.X0_MIN_SIGMA * net(euler, torch.zeros(2), cap, mask)
        assert rel(sampled, finished) < 1e-6 and rel(sampled, euler) > 1e-3
        net.local_decoder.bottleneck[0].weight[:, -net.cfg.dim:].fill_(0.1)  # guards the test: tokens reach the head
        assert rel(net(x, sigma, cap, mask), reference) > 1e-4


@pytest.mark.parametrize("lift_dim", [1, 0], ids=["lift", "x0"])
def test_an_x0_models_sample_is_its_x0_unrounded_in_bf16(lift_dim):
    """The sampler's last step (a lift: its call at sigma = 0) returns the x0 the model predicts, not x0 plus the
    bf16 rounding of the state it read (the model's v is formed from that rounded state)."""
    target = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    class PredictsTarget(torch.nn.Module):  # x0 = target at every sigma, v = (x - x0) / max(sigma, min)
        cfg = model.ZImageConfig(lift_dim=lift_dim, x_prediction=True)

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

        def forward(self, x, sigma, cap, cap_mask):
            return (x.float() - target) / sigma.clamp_min(model.X0_MIN_SIGMA).view(-1, 1, 1, 1)

    noise = model.noise_for_seeds([0, 1], (3, 16, 16))
    sampled = model.sample(PredictsTarget(), noise, None, None, 3, 3.0)
    assert rel(sampled, target) < 1e-6  # x0 + (x - bf16(x)), the rounding kept: about 2e-3


# ---- the paper's recipe, unchanged ----

PAPER_SHA256 = "34ec25504e64bd72f75ec8a0bb9393a288678fa10453eea23bcb3d680bf3529e"  # convert.py before the recipes


def test_paper_recipe_writes_what_convert_wrote_before_the_recipes(tmp_path):
    make_diffusers_dit().save_pretrained(tmp_path / "transformer", max_shard_size="100KB")
    out = tmp_path / "paper.safetensors"
    convert.main(["--src", str(tmp_path / "transformer"), "--out", str(out), "--patch", "16", "--recipe", "paper"])
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    del header["__metadata__"]["source"]  # the source's path, which differs from run to run
    assert hashlib.sha256(json.dumps(header, sort_keys=True).encode() + data[8 + n:]).hexdigest() == PAPER_SHA256
    net = model.load_model(out, dtype=torch.float32)
    assert not (net.cfg.lift_dim or net.cfg.x_prediction or net.cfg.head_sigma)
    # it samples exactly as before: v = -(the head on the noisy image and the raw last-layer tokens)
    torch.nn.init.normal_(net.local_decoder.out_conv.weight, std=0.1)
    g = torch.Generator().manual_seed(0)
    x, cap, sigma = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 5, 24, generator=g), torch.tensor([.7, .2])
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        hidden, _ = net.transformer(model.patchify(x, 16), (2, 2), sigma, cap, mask)
        assert net.local_decoder.out_sign == -1
        net.local_decoder.out_sign = 1.0  # the published head alone: its out_conv predicts x0 - eps
        before = -net.local_decoder(x, hidden.transpose(1, 2).unflatten(2, (2, 2))).float()
        net.local_decoder.out_sign = -1.0
        assert torch.equal(net(x, sigma, cap, mask), before)


def test_recipes_need_their_inputs(zimage_repo, tmp_path):
    with pytest.raises(SystemExit, match="--align-data"):
        convert.main(["--src", str(zimage_repo), "--out", str(tmp_path / "a.safetensors")])
    with pytest.raises(SystemExit, match="fits nothing"):
        convert.main(["--src", str(zimage_repo), "--out", str(tmp_path / "b.safetensors"), "--recipe", "x0",
                      "--align-data", str(tmp_path)])
    single = next((zimage_repo / "transformer").glob("*.safetensors"))  # in a repo: its vae/ is found
    convert.main(["--src", str(single), "--out", str(tmp_path / "c.safetensors"), "--align-data",
                  str(align_images(tmp_path / "i")), "--head-steps", "0"])
    comfy = tmp_path / "models"  # a ComfyUI tree: its vae/ is not this source's repo
    shutil.copytree(zimage_repo / "vae", comfy / "vae")
    (comfy / "diffusion_models").mkdir()
    with pytest.raises(SystemExit, match="no vae/ folder at or above it"):
        convert.main(["--src", str(shutil.copy(single, comfy / "diffusion_models")), "--out",
                      str(tmp_path / "c.safetensors"), "--align-data", str(tmp_path / "i")])
    (tmp_path / "alone").mkdir()
    with pytest.raises(SystemExit, match="no vae/ folder at or above it: pass the source's VAE with --vae"):
        convert.main(["--src", str(shutil.copy(single, tmp_path / "alone")), "--out", str(tmp_path / "c.safetensors"),
                      "--align-data", str(tmp_path / "i")])
    make_flux2_vae().save_pretrained(tmp_path / "klein-vae")  # the other family's VAE: refused before any fit
    with pytest.raises(model.CheckpointError, match="AutoencoderKLFlux2"):
        convert.main(["--src", str(zimage_repo), "--out", str(tmp_path / "d.safetensors"), "--align-data",
                      str(tmp_path / "i"), "--vae", str(tmp_path / "klein-vae")])
    AutoencoderKL(**{**TINY_VAE_CONFIG, "latent_channels": 8}).save_pretrained(tmp_path / "vae-8")  # its latent size
    with pytest.raises(model.CheckpointError, match="its latent tokens hold 32 values, the source DiT reads 64"):
        convert.main(["--src", str(zimage_repo), "--out", str(tmp_path / "e.safetensors"), "--align-data",
                      str(tmp_path / "i"), "--vae", str(tmp_path / "vae-8")])


# ---- real size, meta device ----

@pytest.mark.parametrize("family,name,table,latent_keys", [
    ("zimage", "l2p-lift-1k", "l2p-1k", {"all_final_layer.2-1.adaLN_modulation.1.bias",
                                         "all_final_layer.2-1.adaLN_modulation.1.weight",
                                         "all_final_layer.2-1.linear.bias", "all_final_layer.2-1.linear.weight"}),
    ("flux2", "l2p-lift-flux2-klein-1k", "l2p-flux2-klein-1k", {"norm_out.linear.weight", "proj_out.weight"})])
def test_real_size_lifted_layouts(family, name, table, latent_keys):
    source = model.ZImageConfig() if family == "zimage" else model.Flux2Config()
    with torch.device("meta"):
        net = model.new_model(model.l2p_config(source, 16, recipe="lift", head_sigma=True, head_lift=True))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == read_format(name)  # committed beside the published tables
    paper = read_format(table)
    first = "local_decoder.enc1.0.weight"
    # the released layout + the source's output layer (as the source names it) + the lift; the head reads the noisy
    # image, the lifted prediction and sigma
    assert set(shapes) - set(paper) == latent_keys | {"lift.basis", "lift.scale"} and set(paper) <= set(shapes)
    assert shapes[first] == paper[first][:1] + (7,) + paper[first][2:]
    assert all(shapes[k] == paper[k] for k in paper if k != first)
    d = 64 if family == "zimage" else 128
    assert shapes["lift.basis"] == (d, 768) and shapes["lift.scale"] == ()
    assert model.set_trainable(net, head_only=True)[0] == sum(
        math.prod(s) for k, s in shapes.items() if k.startswith("local_decoder."))
