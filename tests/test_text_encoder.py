import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3Model

from model import CheckpointError, load_text_encoder, qwen3_config_from_shapes, qwen3_from_tensors
from tiny import read_format
from tiny_text import make_tiny_text_encoder

PROMPTS = ["a photo of a cat sitting on a red chair",
           "",  # the CFG negative prompt
           "zebra quokka, xylophone!",
           "a watercolor painting of a mountain lake at sunrise, " * 60]  # well past 512 tokens: truncated


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("zimage"))


@pytest.fixture(scope="module")
def ours_fp32(tiny):
    return load_text_encoder(tiny["root"], dtype=torch.float32).encode(PROMPTS)


def merged_file(tiny, folder: Path) -> Path:
    tensors = {}
    for shard in sorted(tiny["text_encoder"].glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "qwen_3_4b.safetensors")
    return folder / "qwen_3_4b.safetensors"


def test_matches_diffusers_pipeline(tiny, ours_fp32):
    from diffusers import ZImagePipeline
    reference = ZImagePipeline(scheduler=None, vae=None, transformer=None,
                               tokenizer=AutoTokenizer.from_pretrained(tiny["tokenizer"]),
                               text_encoder=Qwen3Model.from_pretrained(tiny["text_encoder"], dtype=torch.float32))
    expected = reference._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=512)  # edits its list
    cap, mask = ours_fp32
    lengths = [len(e) for e in expected]
    assert lengths[3] == 512 and mask.sum(1).tolist() == lengths
    assert torch.equal(mask, torch.arange(512) < mask.sum(1, keepdim=True))  # real tokens first
    assert cap.shape == (len(PROMPTS), 512, tiny["hidden_size"]) and cap.dtype == torch.float32
    for row, m, e in zip(cap, mask, expected):
        assert (row[m] - e).norm() / e.norm() < 1e-5
        assert not row[~m].any()


def test_same_output_from_root_folder_and_single_file(tiny, tmp_path, ours_fp32):
    from_folder = load_text_encoder(tiny["text_encoder"], dtype=torch.float32).encode(PROMPTS)
    file = merged_file(tiny, tmp_path / "elsewhere")
    from_file = load_text_encoder(file, dtype=torch.float32, tokenizer=tiny["tokenizer"]).encode(PROMPTS)
    for cap, mask in (from_folder, from_file):
        assert torch.equal(cap, ours_fp32[0]) and torch.equal(mask, ours_fp32[1])


def test_bf16_close_to_fp32(tiny, ours_fp32):
    cap, mask = load_text_encoder(tiny["root"]).encode(PROMPTS)
    assert cap.dtype == torch.bfloat16 and torch.equal(mask, ours_fp32[1])
    assert (cap.float() - ours_fp32[0]).norm() / ours_fp32[0].norm() < 2e-2


def test_features_can_feed_a_training_graph_and_release_frees(tiny):
    encoder = load_text_encoder(tiny["root"], dtype=torch.float32)
    cap, mask = encoder.encode(["a cat"])
    assert not cap.requires_grad
    torch.nn.Linear(tiny["hidden_size"], 4)(cap).sum().backward()  # fails on inference-mode tensors
    model = encoder.model
    encoder.release()
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(RuntimeError, match="released"):
        encoder.encode(["a cat"])


def test_helpful_errors(tiny, tmp_path):
    folder = shutil.copytree(tiny["text_encoder"], tmp_path / "no_tokenizer" / "text_encoder")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_text_encoder(folder)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_text_encoder(merged_file(tiny, tmp_path / "lonely"))
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="not there"):
        load_text_encoder(folder, tokenizer=tiny["tokenizer"])

    transformer = tmp_path / "transformer"
    transformer.mkdir()
    (transformer / "config.json").write_text('{"_class_name": "ZImageTransformer2DModel", "dim": 3840}')
    with pytest.raises(CheckpointError, match="found ZImageTransformer2DModel config with keys.*text_encoder/"):
        load_text_encoder(transformer)
    with pytest.raises(CheckpointError, match="neither text_encoder/ nor config.json"):
        load_text_encoder(tmp_path)
    save_file({"x_embedder.weight": torch.zeros(4, 4)}, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="not a Qwen3 text encoder"):
        load_text_encoder(tmp_path / "dit.safetensors", tokenizer=tiny["tokenizer"])


def test_qwen3_4b_on_meta_matches_published_keys():
    published = read_format("qwen3-4b-text-encoder")
    config = qwen3_config_from_shapes(published)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (2560, 36, 32, 8, 128, 9728, 151936)
    assert (config.rope_parameters["rope_theta"], config.rms_norm_eps, config.max_position_embeddings,
            config.tie_word_embeddings) == (1e6, 1e-6, 40960, True)
    with torch.device("meta"):
        full = Qwen3Model(config)
    assert {"model." + k: tuple(v.shape) for k, v in full.state_dict().items()} == published
    # The loader takes exactly the published keys (and drops the unused last layer) at full size, without memory.
    model = qwen3_from_tensors(config, ((k, torch.empty(s, device="meta")) for k, s in published.items()),
                               device="meta")
    assert len(model.layers) == 35
