"""The Z-Image DiT against diffusers' ZImageTransformer2DModel, from every published layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import model
from tiny import make_diffusers_dit, read_format, save_single_file, to_comfy, write_random_dit_folder

CAP_LENS = (1, 7, 33, 64)  # one batch mixing caption lengths: 1, 2 and 3 padded runs of 32


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(lens=CAP_LENS, H=12, W=20, seed=1, cap_dim=24):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    x = torch.randn(B, 16, H, W, generator=g)
    sigma = torch.rand(B, generator=g)
    cap = torch.randn(B, max(lens), cap_dim, generator=g)
    mask = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
    return x, sigma, cap, mask


@torch.no_grad()
def reference_v(ref, x, sigma, cap, mask):
    """diffusers takes lists of per-sample tensors, t = 1 - sigma, and returns x0 - eps."""
    caps = [c[m] for c, m in zip(cap, mask)]
    out = ref([xi.unsqueeze(1) for xi in x], 1 - sigma, caps, return_dict=False)[0]
    return -torch.stack([o.squeeze(1) for o in out]).float()


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_dit()


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("transformer")
    ref.save_pretrained(path)
    return path


def test_diffusers_folder_matches(ref, folder):
    ours = model.load_model(folder, dtype=torch.float32)
    x, sigma, cap, mask = inputs()
    v = ours(x, sigma, cap, mask)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert rel(v, reference_v(ref, x, sigma, cap, mask)) < 1e-4


def test_repo_root_and_sharded_folder(ref, tmp_path):
    root = tmp_path / "Z-Image-Turbo"
    ref.save_pretrained(root / "transformer", max_shard_size="40KB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    shards = sorted((root / "transformer").glob("*.safetensors"))
    assert len(shards) >= 3 and (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = model.load_model(root, dtype=torch.float32)
    x, sigma, cap, mask = inputs(H=16, W=8)
    assert rel(ours(x, sigma, cap, mask), reference_v(ref, x, sigma, cap, mask)) < 1e-4


@pytest.mark.parametrize("prefix,norm_final", [("", False), ("model.diffusion_model.", True)])
def test_comfy_single_file(ref, tmp_path, prefix, norm_final):
    state = to_comfy(ref.state_dict(), prefix=prefix, norm_final=norm_final)
    assert any(k.endswith("attention.qkv.weight") for k in state)
    path = save_single_file(state, tmp_path / "z_image_turbo.safetensors")
    ours = model.load_model(path, dtype=torch.float32)
    assert ours.cfg.n_layers == 3 and ours.cfg.n_heads == 2 and ours.cfg.dim == 64 and ours.cfg.cap_feat_dim == 24
    x, sigma, cap, mask = inputs()
    assert rel(ours(x, sigma, cap, mask), reference_v(ref, x, sigma, cap, mask)) < 1e-4


def test_diffusers_named_single_file_with_mixed_dtypes(ref, tmp_path):
    state = {k: (v.to(torch.bfloat16) if k.startswith("layers.1.") else v) for k, v in ref.state_dict().items()}
    path = save_single_file(state, tmp_path / "mixed.safetensors")
    ours = model.load_model(path, dtype=torch.float32)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert torch.equal(ours.layers[1].attention.to_q.weight, state["layers.1.attention.to_q.weight"].float())
    assert torch.equal(ours.layers[0].attention.to_q.weight, state["layers.0.attention.to_q.weight"])


def test_bf16_close_to_fp32_reference(ref, folder):
    ours = model.load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    x, sigma, cap, mask = inputs()
    assert rel(ours(x, sigma, cap, mask), reference_v(ref, x, sigma, cap, mask)) < 3e-2


def test_batch_mates_do_not_change_a_sample(folder):
    ours = model.load_model(folder, dtype=torch.float32)
    x, sigma, cap, mask = inputs()
    together = ours(x, sigma, cap, mask)
    for i in range(len(CAP_LENS)):
        alone = ours(x[i:i + 1], sigma[i:i + 1], cap[i:i + 1, :CAP_LENS[i]], mask[i:i + 1, :CAP_LENS[i]])
        assert rel(together[i:i + 1], alone) < 1e-5


def test_left_padded_caption_mask_equals_right_padded(folder):
    ours = model.load_model(folder, dtype=torch.float32)
    x, sigma, cap, mask = inputs()
    flipped_cap = torch.stack([torch.roll(c, int((~m).sum()), 0) for c, m in zip(cap, mask)])
    flipped_mask = torch.stack([torch.roll(m, int((~m).sum()), 0) for m in mask])
    assert rel(ours(x, sigma, flipped_cap, flipped_mask), ours(x, sigma, cap, mask)) < 1e-6


def test_gradient_checkpointing_same_values_and_grads(folder):
    x, sigma, cap, mask = inputs(lens=(5, 40))
    grads = []
    for checkpointing in (False, True):
        ours = model.load_model(folder, dtype=torch.float32).train()
        ours.gradient_checkpointing = checkpointing
        v = ours(x, sigma, cap, mask)
        v.square().mean().backward()
        grads.append((v.detach(), ours.layers[0].feed_forward.w1.weight.grad.clone(), ours.x_pad_token.grad.clone()))
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-5


def test_errors_name_layout_and_keys(ref, tmp_path):
    state = dict(ref.state_dict())
    state.pop("layers.2.feed_forward.w3.weight")
    state["extra.weight"] = torch.zeros(3)
    path = save_single_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(model.CheckpointError, match=r"single file, diffusers names.*layers\.2\.feed_forward\.w3.*"
                                                    r"extra\.weight"):
        model.load_model(path, dtype=torch.float32)
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(model.CheckpointError, match="not a Z-Image or L2P transformer"):
        model.load_model(tmp_path / "vae.safetensors")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(model.CheckpointError, match="AutoencoderKL"):
        model.load_model(tmp_path / "vae")
    with pytest.raises(model.CheckpointError, match="neither"):
        model.load_model(tmp_path)


def test_bad_input_sizes_are_refused(folder):
    ours = model.load_model(folder, dtype=torch.float32)
    x, sigma, cap, mask = inputs()
    with pytest.raises(ValueError, match="multiples of the patch"):
        ours(x[..., :11, :], sigma, cap, mask)
    with pytest.raises(ValueError, match="no valid token"):
        ours(x, sigma, cap, torch.zeros_like(mask))


def test_real_size_keys_and_shapes_on_meta():
    with torch.device("meta"):
        dit = model.ZImageDiT(model.ZImageConfig())
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    published = read_format("zimage-transformer")
    assert ours == published
    assert len(ours) == 521 and sum(p.numel() for p in dit.parameters()) == 6_154_908_736


def test_real_size_comfy_layout_maps_onto_diffusers_names():
    single = read_format("zimage-transformer-single-file")
    meta = ((model.COMFY_PREFIX + k, torch.empty(s, device="meta")) for k, s in single.items())
    stripped = ((k.removeprefix(model.COMFY_PREFIX), t) for k, t in meta)
    mapped = {k: tuple(t.shape) for k, t in model.zimage_from_comfy(stripped)}
    assert mapped == read_format("zimage-transformer")
    assert model.zimage_config_from_shapes(mapped) == model.ZImageConfig()


PEAK_RSS_SCRIPT = """
import sys, torch
import model
def kib(field):  # VmHWM, unlike ru_maxrss, is not inherited from the forking parent
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
base = kib("VmRSS")
dit = model.load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
touched = sum(float(p.detach().sum()) for p in dit.parameters())  # every weight page really resident
print((kib("VmHWM") - base) * 1024)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_a_sharded_checkpoint_holds_about_one_copy(tmp_path, dtype):
    """~180 MB of random fp32 shards; the loader's peak RSS growth is compared with the checkpoint size."""
    folder, size, n_shards = write_random_dit_folder(tmp_path / "transformer")
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(folder), dtype], capture_output=True, text=True,
                         check=True, cwd=str(Path(model.__file__).parent))
    ratio = int(out.stdout.split()[-1]) / size
    print(f"checkpoint {size / 1e6:.0f} MB in {n_shards} shards, loaded as {dtype}: peak RSS growth {ratio:.2f}x")
    assert size > 150e6 and ratio < 1.3


def test_runtime_scripts_import_no_diffusers():
    code = "import sys, model, convert, sample; print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(model.__file__).parent))
    assert out.stdout.strip() == "[]"
