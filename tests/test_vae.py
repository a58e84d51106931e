"""FLUX.1 VAE: exact names/shapes at real size, and numerics against diffusers' AutoencoderKL on tiny random weights."""


import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, FluxVAE, FluxVAEConfig, vae_from_ldm, load_vae
from tiny import read_format
from tiny_vae import TINY_VAE_CONFIG, save_tiny_vae, write_ae_safetensors

TINY_CONFIG = FluxVAEConfig(**{k: v for k, v in TINY_VAE_CONFIG.items() if k in FluxVAEConfig.__dataclass_fields__})


def shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def rel_err(ours, ref) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- real size, on the meta device ----

def test_real_size_names_and_shapes_match_published_vae():
    published = read_format("flux-vae")
    with torch.device("meta"):
        vae = FluxVAE(FluxVAEConfig())
    assert shapes(vae.state_dict()) == published
    assert len(published) == 244
    assert sum(torch.Size(s).numel() for s in published.values()) == 83_819_683
    assert vae.downscale == 8


def test_ldm_names_of_ae_safetensors_map_onto_diffusers_names():
    ldm = read_format("flux-vae-single-file")
    mapped = dict(vae_from_ldm((k, torch.empty(s, device="meta")) for k, s in ldm.items()))
    assert len(mapped) == len(ldm)  # no two LDM names land on one key
    assert shapes(mapped) == read_format("flux-vae")


# ---- tiny random weights against diffusers ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The diffusers reference, its outputs, and the same weights written in every layout load_vae reads."""
    root = tmp_path_factory.mktemp("tiny_vae")
    ref = save_tiny_vae(root / "repo" / "vae")
    save_tiny_vae(root / "sharded", max_shard_size="1MB")
    paths = {
        "repo root": root / "repo",
        "diffusers folder": root / "repo" / "vae",
        "sharded folder": root / "sharded",
        "diffusers single file": root / "repo" / "vae" / "diffusion_pytorch_model.safetensors",
        "ae.safetensors": write_ae_safetensors(ref, root / "ae.safetensors"),
        "ae.safetensors first_stage_model.":
            write_ae_safetensors(ref, root / "ae_fsm.safetensors", "first_stage_model."),
        "ae.safetensors vae.": write_ae_safetensors(ref, root / "ae_vae.safetensors", "vae."),
    }
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 48, 80, generator=gen) * 2 - 1  # non-square, in [-1, 1]
    z = torch.randn(2, 16, 6, 10, generator=gen)
    s, m = ref.config.scaling_factor, ref.config.shift_factor
    with torch.no_grad():
        ref_latent = (ref.encode(img).latent_dist.mean - m) * s
        ref_img = ref.decode(z / s + m).sample
    return dict(ref=ref, paths=paths, root=root, img=img, z=z, ref_latent=ref_latent, ref_img=ref_img)


def test_tiny_checkpoints_are_not_degenerate(tiny):
    assert len(list((tiny["root"] / "sharded").glob("*.safetensors"))) > 1
    assert tiny["ref_latent"].shape == (2, 16, 6, 10) and tiny["ref_img"].shape == (2, 3, 48, 80)
    assert 0.02 < tiny["ref_latent"].std() < 1 and 0.02 < tiny["ref_img"].std() < 1


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_written_ae_safetensors_is_what_diffusers_reads(tiny, prefix, tmp_path):
    # diffusers' own LDM converter, not our mapping, takes the file back to the reference weights, bit for bit
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = write_ae_safetensors(tiny["ref"], tmp_path / "ae.safetensors", prefix)
    converted = convert_ldm_vae_checkpoint(load_file(str(path)), dict(tiny["ref"].config))
    expected = tiny["ref"].state_dict()
    assert converted.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("layout", ["repo root", "diffusers folder", "sharded folder", "diffusers single file",
                                    "ae.safetensors", "ae.safetensors first_stage_model.", "ae.safetensors vae."])
def test_matches_diffusers_fp32(tiny, layout):
    vae = load_vae(tiny["paths"][layout], config=None if "folder" in layout or layout == "repo root" else TINY_CONFIG)
    assert vae.cfg == TINY_CONFIG
    with torch.no_grad():
        latent, img = vae.encode(tiny["img"]), vae.decode(tiny["z"])
    assert latent.dtype == img.dtype == torch.float32
    assert rel_err(latent, tiny["ref_latent"]) < 1e-4
    assert rel_err(img, tiny["ref_img"]) < 1e-4


def test_bf16_close_to_diffusers_fp32(tiny):
    vae = load_vae(tiny["paths"]["ae.safetensors"], dtype=torch.bfloat16, config=TINY_CONFIG)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    with torch.no_grad():  # one sample: bf16 convolutions are slow on CPU
        latent, img = vae.encode(tiny["img"][:1]), vae.decode(tiny["z"][:1])
    assert latent.dtype == img.dtype == torch.bfloat16
    assert rel_err(latent, tiny["ref_latent"][:1]) < 3e-2
    assert rel_err(img, tiny["ref_img"][:1]) < 6e-2  # diffusers' own bf16 decode is ~3% off on these weights


def test_encode_rejects_sizes_not_multiple_of_8(tiny):
    vae = load_vae(tiny["paths"]["diffusers folder"])
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 48, 84))


# ---- errors ----

def test_missing_key_names_layout_and_key(tiny, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text((tiny["paths"]["diffusers folder"] / "config.json").read_text())
    state = load_file(str(tiny["paths"]["diffusers single file"]))
    del state["decoder.mid_block.attentions.0.to_q.weight"]
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    missing = r"decoder\.mid_block\.attentions\.0\.to_q\.weight"
    with pytest.raises(CheckpointError, match=rf"folder, diffusers names.*missing.*{missing}"):
        load_vae(folder)


@pytest.mark.parametrize("layout", ["LDM", "diffusers"])
def test_single_file_of_another_size_reads_its_architecture_from_shapes(tmp_path, layout):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    size = dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                use_quant_conv=False, use_post_quant_conv=False)
    ref = AutoencoderKL(**size).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))  # biases and norms away from their 0 / 1 defaults
    path = tmp_path / "vae.safetensors"
    if layout == "LDM":
        write_ae_safetensors(ref, path)
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    vae = load_vae(path)
    assert (vae.cfg.block_out_channels, vae.cfg.layers_per_block, vae.cfg.latent_channels) == ((32, 64, 64), 1, 4)
    img = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = (ref.encode(img).latent_dist.mean - vae.cfg.shift_factor) * vae.cfg.scaling_factor
        assert rel_err(vae.encode(img), expected) < 1e-4


def test_single_file_that_cannot_use_32_groups_asks_for_its_config(tiny):
    with pytest.raises(CheckpointError, match=r"cannot use 32 GroupNorm groups.*config"):
        load_vae(tiny["paths"]["ae.safetensors"])


def test_non_vae_file_is_refused(tmp_path):
    path = tmp_path / "transformer.safetensors"
    save_file({"layers.0.attention.qkv.weight": torch.zeros(8, 4), "x_embedder.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="not a VAE.*layers.0.attention.qkv.weight.*ae.safetensors"):
        load_vae(path)
