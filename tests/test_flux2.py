"""FLUX.2 [klein]: DiT, VAE, text features, sampler and whole generations against diffusers 0.42.1 (tiny random
checkpoints in the published layouts; nothing is downloaded), and the real-size key tables on the meta device."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]

import model
import model as flux2  # the FLUX.2 parts of model.py, named as such below
from tiny import KLEIN_SCHEDULER, TINY_FLUX2_DIT as TINY_DIT, make_diffusers_dit, make_flux2_dit as make_ref_dit
from tiny import make_flux2_vae as make_ref_vae, make_tiny_klein_repo, randomise_, read_format, set_distilled, to_comfy
from tiny_text import make_tiny_text_encoder
from tiny_vae import ldm_vae_name, ldm_vae_state_dict, save_tiny_vae

TINY_CFG = flux2.Flux2Config(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
CAP_LENS = (1, 7, 40)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- DiT ----

def inputs(B=2, h=3, w=5, L=7, seed=1, channels=16, cap_dim=24):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, channels, h, w, generator=g), torch.rand(B, generator=g),
            torch.randn(B, L, cap_dim, generator=g), torch.ones(B, L, dtype=torch.bool))


@torch.no_grad()
def reference_v(ref, x, sigma, cap):
    """diffusers on packed tokens [B, h*w, C], ids from the klein pipeline's own helpers; its output is v."""
    from diffusers import Flux2KleinPipeline

    out = ref(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=cap, timestep=sigma,
              img_ids=Flux2KleinPipeline._prepare_latent_ids(x), txt_ids=Flux2KleinPipeline._prepare_text_ids(cap),
              guidance=None, return_dict=False)[0]
    return out.transpose(1, 2).unflatten(2, x.shape[2:])


BFL_NAMES = [  # (diffusers pattern, BFL name), written independently of flux2.flux2_from_bfl
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (r"_modulation(_img|_txt)?\.linear\.", r"_modulation\1.lin."),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
]


def to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers state -> a BFL single file's: q, k, v fused by rows, the final adaLN rows [scale; shift] written
    as [shift; scale], everything else renamed by BFL_NAMES."""
    out = {}
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}):
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            out[f"double_blocks.{i}.{stream}_attn.qkv.weight"] = torch.cat(
                [state[f"transformer_blocks.{i}.attn.{n}.weight"] for n in names])
    for key, t in state.items():
        if re.match(r"transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj)\.", key):
            continue
        if key == "norm_out.linear.weight":
            scale, shift = t.chunk(2)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
            continue
        for pattern, new in BFL_NAMES:
            key = re.sub(pattern, new, key)
        out[key] = t
    return {prefix + k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def ref():
    return make_ref_dit()


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("flux2") / "transformer"
    ref.save_pretrained(path)
    return path


@pytest.mark.parametrize("L", CAP_LENS)
def test_diffusers_folder_matches(ref, folder, L):
    ours = flux2.load_model(folder, dtype=torch.float32)
    assert ours.cfg == TINY_CFG
    x, sigma, cap, mask = inputs(L=L)
    v = ours(x, sigma, cap, mask)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert rel(v, reference_v(ref, x, sigma, cap)) < 1e-4


def test_output_depends_on_grid_order_and_caption(ref, folder):
    """The comparisons above are sensitive: transposing the grid or reordering the caption changes v by far more
    than the ~1e-7 the comparisons allow (3e-3 and 1e-3 on these weights)."""
    ours = flux2.load_model(folder, dtype=torch.float32)
    x, sigma, cap, mask = inputs(h=4, w=4)
    v = ours(x, sigma, cap, mask)
    assert rel(ours(x.transpose(2, 3), sigma, cap, mask).transpose(2, 3), v) > 1e-4
    assert rel(ours(x, sigma, cap.roll(1, dims=1), mask), v) > 1e-4


def test_repo_root_and_sharded_folder(ref, tmp_path):
    root = tmp_path / "FLUX.2-klein-4B"
    ref.save_pretrained(root / "transformer", max_shard_size="40KB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    assert len(list((root / "transformer").glob("*.safetensors"))) >= 3
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert flux2.open_checkpoint(root).cfg.family == "flux2"
    ours = flux2.load_model(root, dtype=torch.float32)  # the dispatching load_model
    assert isinstance(ours, flux2.Flux2DiT)
    x, sigma, cap, mask = inputs(h=6, w=2, L=40)
    assert rel(ours(x, sigma, cap, mask), reference_v(ref, x, sigma, cap)) < 1e-4


def test_to_bfl_is_what_diffusers_reads(ref):
    """Our test writer of BFL files, checked by diffusers' own converter (which pops from its input)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    state = ref.state_dict()
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(to_bfl(state)))
    assert converted.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file(ref, tmp_path, prefix):
    # Fails (rel 5e-2) when flux2_from_bfl does not swap the final adaLN's [shift; scale] halves: checked by hand.
    path = tmp_path / "flux-2-klein-4b.safetensors"
    save_file(to_bfl(ref.state_dict(), prefix), str(path))
    assert flux2.open_checkpoint(path).cfg.family == "flux2"
    checkpoint = flux2.open_checkpoint(path, family="flux2")
    assert checkpoint.layout == "single file, BFL names" + (f", prefix '{prefix}'" if prefix else "")
    assert checkpoint.cfg == TINY_CFG
    ours = flux2.load_model(path, dtype=torch.float32)
    for L in CAP_LENS:
        x, sigma, cap, mask = inputs(L=L, h=5, w=3, seed=L)
        assert rel(ours(x, sigma, cap, mask), reference_v(ref, x, sigma, cap)) < 1e-4


def test_diffusers_named_single_file_in_bf16(ref, folder):
    ours = flux2.load_model(folder / "diffusion_pytorch_model.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    x, sigma, cap, mask = inputs()
    v = ours(x, sigma, cap, mask)
    assert v.dtype == torch.float32 and rel(v, reference_v(ref, x, sigma, cap)) < 3e-2


def test_transformer_returns_the_tokens_before_norm_out(ref, folder):
    """The L2P split point: transformer() = the last single block's image tokens, as diffusers feeds norm_out."""
    seen = []
    handle = ref.norm_out.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x, sigma, cap, mask = inputs(h=4, w=6)
    reference_v(ref, x, sigma, cap)
    handle.remove()
    ours = flux2.load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        tokens, temb = ours.transformer(x.flatten(2).transpose(1, 2), (4, 6), sigma, cap, mask)
    assert tokens.shape == (2, 24, 32) and temb.shape == (2, 32)
    assert rel(tokens, seen[0]) < 1e-4


def test_gradient_checkpointing_same_values_and_grads(folder):
    x, sigma, cap, mask = inputs()
    results = []
    for checkpointing in (False, True):
        ours = flux2.load_model(folder, dtype=torch.float32).train()
        ours.gradient_checkpointing = checkpointing
        v = ours(x, sigma, cap, mask)
        v.square().mean().backward()
        results.append((v.detach(), ours.transformer_blocks[0].attn.to_q.weight.grad.clone(),
                        ours.single_stream_modulation.linear.weight.grad.clone()))
    for a, b in zip(*results):
        assert rel(a, b) < 1e-5


def test_real_size_keys_and_shapes_on_meta():
    with torch.device("meta"):
        dit = flux2.Flux2DiT(flux2.Flux2Config())
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert ours == read_format("flux2-klein-4b-transformer")
    assert len(ours) == 169 and sum(p.numel() for p in dit.parameters()) == 3_875_544_576


def test_real_size_bfl_layout_maps_onto_diffusers_names():
    single = read_format("flux2-klein-4b-single-file")
    assert len(single) == 149
    mapped = {k: tuple(t.shape) for k, t in flux2.flux2_from_bfl((k, torch.empty(s, device="meta"))
                                                                for k, s in single.items())}
    assert mapped == read_format("flux2-klein-4b-transformer")
    assert flux2.flux2_config_from_shapes(mapped) == flux2.Flux2Config()


def test_wrong_files_name_the_layout_seen(ref, tmp_path):
    zimage = make_diffusers_dit()
    save_file(to_comfy(zimage.state_dict(), prefix="model.diffusion_model."), str(tmp_path / "z_image.safetensors"))
    with pytest.raises(model.CheckpointError, match=r"single file, diffusers names, prefix 'model\.diffusion_model\.'"
                                                    r"\) is not a FLUX\.2 transformer: it looks like a Z-Image"):
        flux2.open_checkpoint(tmp_path / "z_image.safetensors", family="flux2")
    zimage.save_pretrained(tmp_path / "zimage" / "transformer")
    assert flux2.open_checkpoint(tmp_path / "zimage").cfg.family == "zimage"
    with pytest.raises(model.CheckpointError, match="ZImageTransformer2DModel, not a FLUX.2 transformer"):
        flux2.open_checkpoint(tmp_path / "zimage", family="flux2")

    vae = make_ref_vae()
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(model.CheckpointError, match="describes a AutoencoderKLFlux2, not a FLUX.2 transformer"):
        flux2.open_checkpoint(tmp_path / "vae", family="flux2")
    with pytest.raises(model.CheckpointError, match=r"single file, diffusers names\) is not a FLUX\.2 transformer: "
                                                    r"it looks like FLUX\.2's VAE"):
        flux2.open_checkpoint(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", family="flux2")
    ref.save_pretrained(tmp_path / "transformer")
    with pytest.raises(model.CheckpointError, match="describes a Flux2Transformer2DModel, not FLUX.2's "
                                                    "AutoencoderKLFlux2"):
        flux2.load_vae(tmp_path / "transformer", family="flux2")
    save_tiny_vae(tmp_path / "flux1_vae")
    with pytest.raises(model.CheckpointError, match="describes a AutoencoderKL, not FLUX.2's"):
        flux2.load_vae(tmp_path / "flux1_vae", family="flux2")
    with pytest.raises(model.CheckpointError, match=r"single file, diffusers names\) has no bn.running_mean: it "
                                                    "looks like a FLUX.1 / Z-Image VAE"):
        flux2.load_vae(tmp_path / "flux1_vae" / "diffusion_pytorch_model.safetensors", family="flux2")

    state = to_bfl(ref.state_dict())
    del state["single_blocks.1.linear2.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(model.CheckpointError, match=r"'single file, BFL names'.*single_transformer_blocks\.1\.attn\."
                                                    r"to_out\.weight.*extra\.weight"):
        flux2.load_model(tmp_path / "broken.safetensors")


# ---- VAE ----

def bfl_vae_state(vae, prefix=""):
    """AutoencoderKLFlux2 -> BFL ae.safetensors names: FLUX.1's LDM names (tests/tiny_vae), the 1x1 convs inside
    encoder / decoder."""
    state = ldm_vae_state_dict(vae)
    moved = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
    out = {}
    for key, t in state.items():
        for old, new in moved.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        out[prefix + key] = t
    return out


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import Flux2KleinPipeline

    root = tmp_path_factory.mktemp("flux2_vae")
    ref = make_ref_vae()
    ref.save_pretrained(root / "repo" / "vae")
    ref.save_pretrained(root / "sharded", max_shard_size="20KB")
    save_file(bfl_vae_state(ref), str(root / "ae.safetensors"))
    save_file(bfl_vae_state(ref, "vae."), str(root / "ae_vae.safetensors"))
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 24, 40, generator=gen) * 2 - 1
    z = torch.randn(2, 16, 6, 10, generator=gen)
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = (ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps).sqrt()
    with torch.no_grad():
        latent = Flux2KleinPipeline._patchify_latents(ref.encode(img).latent_dist.mode())
        ref_latent = (latent - mean) / std
        ref_img = ref.decode(Flux2KleinPipeline._unpatchify_latents(z * std + mean)).sample
    paths = {"repo root": root / "repo", "diffusers folder": root / "repo" / "vae", "sharded folder": root / "sharded",
             "ae.safetensors": root / "ae.safetensors", "ae.safetensors vae.": root / "ae_vae.safetensors"}
    return dict(ref=ref, paths=paths, img=img, z=z, ref_latent=ref_latent, ref_img=ref_img)


def test_tiny_vae_is_not_degenerate(tiny_vae):
    assert len(list(tiny_vae["paths"]["sharded folder"].glob("*.safetensors"))) > 1
    assert tiny_vae["ref_latent"].shape == (2, 16, 6, 10) and tiny_vae["ref_img"].shape == (2, 3, 24, 40)
    assert 0.3 < tiny_vae["ref_latent"].std() < 3 and 0.02 < tiny_vae["ref_img"].std() < 1


def test_bfl_vae_writer_round_trips_through_diffusers_ldm_converter(tiny_vae):
    """The encoder / decoder part of our BFL-named test file is what diffusers' LDM converter reads."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = tiny_vae["ref"]
    state = load_file(str(tiny_vae["paths"]["ae.safetensors"]))
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "bn.running_var"} <= state.keys()
    ldm = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.")) and "quant_conv" not in k}
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    expected = {k: v for k, v in ref.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], v) for k, v in expected.items())


@pytest.mark.parametrize("layout", ["repo root", "diffusers folder", "sharded folder", "ae.safetensors",
                                    "ae.safetensors vae."])
def test_vae_matches_diffusers(tiny_vae, layout):
    config = None if "safetensors" not in layout else flux2.Flux2VAEConfig(
        latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae = flux2.load_vae(tiny_vae["paths"][layout], config=config, family="flux2")
    assert vae.cfg.latent_channels == 4 and vae.cfg.block_out_channels == (8, 16) and vae.downscale == 4
    assert vae.bn.num_batches_tracked.item() == 0  # not read
    with torch.no_grad():
        latent, img = vae.encode(tiny_vae["img"]), vae.decode(tiny_vae["z"])
    assert latent.dtype == img.dtype == torch.float32
    assert rel(latent, tiny_vae["ref_latent"]) < 1e-4
    assert rel(img, tiny_vae["ref_img"]) < 1e-4
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(tiny_vae["img"][..., :38])


def test_vae_folder_without_config_is_read_like_a_single_file(tiny_vae, tmp_path):
    """No config.json: the bn statistics say FLUX.2, and the architecture comes from `config` (klein's by default)."""
    for file in tiny_vae["paths"]["diffusers folder"].glob("*.safetensors"):
        shutil.copy(file, tmp_path / file.name)
    config = flux2.Flux2VAEConfig(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae = flux2.load_vae(tmp_path, config=config)
    assert isinstance(vae, flux2.Flux2VAE)
    with torch.no_grad():
        assert rel(vae.encode(tiny_vae["img"]), tiny_vae["ref_latent"]) < 1e-4


def test_vae_real_size_on_meta():
    with torch.device("meta"):
        vae = flux2.Flux2VAE(flux2.Flux2VAEConfig())
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == read_format("flux2-vae")
    assert len(ours) == 251 and "bn.num_batches_tracked" in ours and vae.downscale == 16


def test_vae_real_size_bfl_names_map_onto_diffusers_names():
    """BFL's ae.safetensors names, written from the real-size table by tests/tiny_vae's LDM naming (attention
    projections as 1x1 convs), map back onto the table."""
    table = read_format("flux2-vae")
    bfl = {}
    for key, shape in table.items():
        name = ldm_vae_name(key, levels=4)
        if name.startswith(("quant_conv.", "post_quant_conv.")):  # BFL keeps them inside the encoder / decoder
            name = ("encoder." if name.startswith("quant_conv.") else "decoder.") + name
        bfl[name] = shape + (1, 1) if ".attn_1." in name and len(shape) == 2 else shape
    assert "encoder.mid.attn_1.q.weight" in bfl and "decoder.up.3.upsample.conv.weight" in bfl
    mapped = dict(flux2.vae_from_ldm((k, torch.empty(s, device="meta")) for k, s in bfl.items()))
    assert {k: tuple(t.shape) for k, t in mapped.items()} == table


# ---- text features ----

PROMPTS = ["a photo of a cat sitting on a red chair", "", "zebra quokka, xylophone!",
           "a watercolor painting of a mountain lake at sunrise, " * 60]  # past 512 tokens: truncated


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    text = make_tiny_text_encoder(root)  # Qwen3, 3 layers, hidden 64
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    return text


@pytest.mark.parametrize("layers", [(1, 2, 3), (0, 2, 1)])  # all 3 layers + final norm; the first 2 layers only
def test_text_features_match_klein_pipeline(tiny_text, layers):
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    encoder = flux2.load_text_encoder(tiny_text["root"], dtype=torch.float32, layers=layers)
    assert encoder.family == "flux2" and len(encoder.model.layers) == max(layers)
    cap, mask = encoder.encode(PROMPTS)
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        Qwen3ForCausalLM.from_pretrained(tiny_text["text_encoder"], dtype=torch.float32),
        AutoTokenizer.from_pretrained(tiny_text["tokenizer"]), list(PROMPTS), max_sequence_length=512,
        hidden_states_layers=layers)
    assert cap.shape == expected.shape == (len(PROMPTS), 512, 3 * tiny_text["hidden_size"])
    assert cap.dtype == torch.float32 and mask.dtype == torch.bool and mask.all()
    assert rel(cap, expected) < 1e-5
    assert rel(cap[1], expected[1]) < 1e-5  # the empty (negative) prompt too


def test_a_short_caption_length_declared_by_the_repo_is_the_recipes(tiny_text, tmp_path):
    """A toy source declares its caption length in its tokenizer_config.json (model_max_length); the flux2 recipe
    then pads and truncates to it, as Flux2KleinPipeline does with that max_sequence_length."""
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    root = shutil.copytree(tiny_text["root"], tmp_path / "short")
    config = root / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": 24}))
    cap, mask = flux2.load_text_encoder(root, dtype=torch.float32, layers=(1, 2, 3)).encode(PROMPTS)
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        Qwen3ForCausalLM.from_pretrained(tiny_text["text_encoder"], dtype=torch.float32),
        AutoTokenizer.from_pretrained(tiny_text["tokenizer"]), list(PROMPTS), max_sequence_length=24,
        hidden_states_layers=(1, 2, 3))
    assert cap.shape == expected.shape == (len(PROMPTS), 24, 3 * tiny_text["hidden_size"]) and mask.all()
    assert rel(cap, expected) < 1e-5


def test_zimage_recipe_is_the_default_without_a_flux2_model_index(tiny_text, tmp_path):
    """Without Flux2KleinPipeline's model_index.json beside it, the same Qwen3 gives Z-Image's features: the
    second-to-last hidden state of the real tokens, its last layer not even loaded."""
    from transformers import Qwen3Model

    encoder = flux2.load_text_encoder(tiny_text["text_encoder"], dtype=torch.float32, family="zimage")
    cap, mask = encoder.encode(PROMPTS)
    assert len(encoder.model.layers) == tiny_text["num_layers"] - 1
    full = Qwen3Model.from_pretrained(tiny_text["text_encoder"], dtype=torch.float32).eval()
    ids = encoder.tokenizer([encoder.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                             tokenize=False, add_generation_prompt=True, enable_thinking=True)], return_tensors="pt")
    with torch.no_grad():
        expected = full(**ids, output_hidden_states=True).hidden_states[-2][0]
    assert rel(cap[0, mask[0]], expected) < 1e-5
    assert flux2.pipeline_family(tiny_text["root"]) == "flux2" and flux2.pipeline_family(tmp_path) == "zimage"


# ---- sampler ----

def test_empirical_mu_and_sigmas_equal_the_klein_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for seq in (96, 1024, 4096, 4300, 4301, 16384):
        for steps in (1, 4, 28, 50, 250):
            mu = flux2.compute_empirical_mu(seq, steps)
            assert mu == pytest.approx(compute_empirical_mu(seq, steps), rel=1e-12)
            if steps in (4, 50):
                scheduler = FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER)
                scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
                assert torch.allclose(model.shifted_sigmas(steps, np.exp(mu)), scheduler.sigmas, atol=1e-6)


def test_sampler_settings(tmp_path):
    for distilled in (True, False):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                                "is_distilled": distilled}))
        settings = flux2.flux2_sampler_settings(tmp_path, 1024, 1024)
        assert settings["steps"] == (4 if distilled else 50) and settings["guidance"] == (1.0 if distilled else 4.0)
        assert settings["shift"] == pytest.approx(9.887 if distilled else 7.564, abs=1e-3)
    assert flux2.flux2_sampler_settings(tmp_path, 512, 512, steps=4)["shift"] == pytest.approx(7.62, abs=1e-2)
    assert flux2.flux2_sampler_settings(tmp_path / "none", 512, 512, distilled=True)["steps"] == 4
    with pytest.raises(model.CheckpointError, match="model_index.json"):
        flux2.flux2_sampler_settings(tmp_path / "none", 512, 512)


# ---- whole generations ----

H, W = 32, 48  # tiny VAE downscale 4: an 8 x 12 token grid, non-square
GEN_PROMPTS = ["a red cube on a table", "two cats"]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def klein_repo(tmp_path_factory):
    return make_tiny_klein_repo(tmp_path_factory.mktemp("FLUX.2-klein-tiny"), distilled=True, text_layers=3)


@pytest.fixture(scope="module")
def klein_ours(klein_repo):
    set_distilled(klein_repo, True)
    return (flux2.load_model(klein_repo, dtype=torch.float32), flux2.load_vae(klein_repo),
            flux2.load_text_encoder(klein_repo, dtype=torch.float32, layers=(1, 2, 3)))


@pytest.mark.parametrize("distilled,steps", [(True, None), (False, 3)])  # base: CFG 4.0, fewer steps than 50
def test_generation_matches_klein_pipeline(klein_repo, klein_ours, distilled, steps):
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    set_distilled(klein_repo, distilled)
    dit, vae, text = klein_ours
    settings = flux2.flux2_sampler_settings(klein_repo, H, W, steps=steps)
    assert settings["steps"] == (4 if distilled else 3) and settings["guidance"] == (1.0 if distilled else 4.0)
    cap, mask = text.encode(GEN_PROMPTS)
    neg, neg_mask = text.encode([""] * len(GEN_PROMPTS))
    images = flux2.generate(dit, cap, mask, SEEDS, H, W, neg_cap=neg, neg_mask=neg_mask, vae=vae, **settings)

    reference = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(klein_repo / "scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(klein_repo / "vae"),
        text_encoder=Qwen3ForCausalLM.from_pretrained(klein_repo / "text_encoder", dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(klein_repo / "tokenizer"),
        transformer=Flux2Transformer2DModel.from_pretrained(klein_repo / "transformer"), is_distilled=distilled)
    reference.set_progress_bar_config(disable=True)
    noise = model.noise_for_seeds(SEEDS, (16, H // 4, W // 4))
    expected = reference(prompt=GEN_PROMPTS, height=H, width=W, num_inference_steps=settings["steps"],
                         guidance_scale=4.0 if not distilled else 1.0, latents=noise, output_type="pt",
                         text_encoder_out_layers=(1, 2, 3)).images  # [0, 1]
    assert images.shape == (2, 3, H, W)
    assert rel((images / 2 + 0.5).clamp(0, 1), expected) < 1e-4
    if not distilled:  # CFG really acted: the unguided result differs
        unguided = flux2.generate(dit, cap, mask, SEEDS, H, W, settings["steps"], settings["shift"], vae=vae)
        assert rel(unguided, images) > 1e-3


def test_generate_refuses_bad_sizes_and_missing_vae(klein_ours):
    dit, vae, text = klein_ours
    cap, mask = text.encode(GEN_PROMPTS[:1])
    with pytest.raises(ValueError, match=r"multiples of 4 .*VAE x4 times latent patch 4"):
        flux2.generate(dit, cap, mask, [0], 30, 48, steps=1, shift=3.0, vae=vae)
    with pytest.raises(ValueError, match="needs its VAE"):
        flux2.generate(dit, cap, mask, [0], 32, 48, steps=1, shift=3.0)


def test_runtime_code_imports_no_diffusers():
    code = "import sys, model; print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(ROOT))
    assert out.stdout.strip() == "[]"


PEAK_RSS_SCRIPT = """
import sys, torch
import model as flux2
def kib(field):  # VmHWM, unlike ru_maxrss, is not inherited from the forking parent
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
base = kib("VmRSS")
dit = flux2.load_model(sys.argv[1], dtype=torch.float32)
touched = sum(float(p.detach().sum()) for p in dit.parameters())  # every weight page really resident
print((kib("VmHWM") - base) * 1024)
"""


def test_loading_a_bfl_file_holds_about_one_copy(tmp_path):
    """~160 MB of random fp32 weights in BFL names: splitting the fused qkv and swapping the adaLN halves add no
    copy (nor does the config inference, whose meta-tensor torch.cat once cost 75 MB of imports: 1.58x). The
    loader's peak RSS growth is compared with the file size."""
    cfg = flux2.Flux2Config(num_layers=2, num_single_layers=6, num_attention_heads=4, joint_attention_dim=1024)
    with torch.device("meta"):
        shapes = flux2.Flux2DiT(cfg).state_dict()
    path = tmp_path / "flux-2-klein.safetensors"
    save_file(to_bfl({k: torch.randn(t.shape) for k, t in shapes.items()}, "model.diffusion_model."), str(path))
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True, cwd=str(ROOT))
    ratio = int(out.stdout.split()[-1]) / path.stat().st_size
    print(f"BFL file of {path.stat().st_size / 1e6:.0f} MB loaded as fp32: peak RSS growth {ratio:.2f}x")
    assert path.stat().st_size > 150e6 and ratio < 1.3


def test_load_vae_reads_flux2s_vae_too(klein_repo):
    vae = model.load_vae(klein_repo)
    assert isinstance(vae, model.Flux2VAE) and vae.downscale == 4 and vae.cfg.latent_channels == 4


@pytest.fixture(scope="module")
def klein_base_repo(tmp_path_factory):
    """A klein-base repo whose tiny Qwen3 has the 27+ layers that FLUX.2's hidden states 9, 18, 27 need, as the
    scripts read it (no layers= override)."""
    return make_tiny_klein_repo(tmp_path_factory.mktemp("FLUX.2-klein-base-tiny"), distilled=False, seed=4)


def test_synth_and_sample_take_a_flux2_source(klein_base_repo, tmp_path):
    import sample
    import synth

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(GEN_PROMPTS) + "\n")
    out = tmp_path / "corpus"
    synth.main(["--src", str(klein_base_repo), "--prompts", str(prompts), "--out", str(out), "--seeds", "1",
                "--width", str(W), "--height", str(H), "--steps", "2"])
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    settings = flux2.source_sampler_settings(klein_base_repo, H, W, steps=2)
    assert (rows[0]["guidance"], rows[0]["shift"]) == (4.0, settings["shift"])  # klein-base's guidance 4.0
    text = model.load_text_encoder(klein_base_repo, dtype=torch.float32)
    dit, vae = model.load_model(klein_base_repo, dtype=torch.float32), model.load_vae(klein_base_repo)
    neg = model.read_caption_features(model.caption_features_path(out / "features", ""))
    assert neg.shape == (512, 3 * 64)  # FLUX.2's features: every one of the 512 positions
    for i, row in enumerate(rows):
        cap = model.read_caption_features(out / row["features"], GEN_PROMPTS[i])
        assert torch.equal(cap, text.encode([GEN_PROMPTS[i]])[0][0].to(torch.bfloat16))
        expected = model.generate(dit, cap[None], torch.ones(1, 512, dtype=torch.bool), [row["seed"]], H, W, vae=vae,
                                  neg_cap=neg[None], neg_mask=torch.ones(1, 512, dtype=torch.bool), **settings)
        pixels = np.asarray(Image.open(out / row["file_name"]).convert("RGB"))
        assert np.array_equal(pixels, model.to_uint8(expected)[0])
    sample.main(["--latent", str(klein_base_repo), "--prompt", GEN_PROMPTS[0], "--width", str(W), "--height", str(H),
                 "--latent-steps", "2", "--seed", str(rows[0]["seed"]), "--out", str(tmp_path / "latent.png"),
                 "--device", "cpu"])
    cap, mask = text.encode([GEN_PROMPTS[0]])  # sample.py conditions on fp32 features, not the bf16 cache
    neg, neg_mask = text.encode([""])
    expected = model.generate(dit, cap, mask, [rows[0]["seed"]], H, W, vae=vae, neg_cap=neg, neg_mask=neg_mask,
                              **settings)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "latent_latent.png").convert("RGB")),
                          model.to_uint8(expected)[0])
