"""bench/speed.py at --size tiny: every section runs and writes its JSON, every measured number is positive and
finite. Smoke tests only: no timing is ever asserted."""

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
    result = speed.main(["--device", "cpu", "--size", "tiny", "--in-process", "--out", str(out)])
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
    assert "ours" in dit["implementations"]
    # diffusers is a test requirement, so it must have been measured; DiffSynth is optional but then says why not
    assert "diffusers" in dit["implementations"]
    for ratios in (dit["ratios"], dit["paired_ratios"]):
        assert set(ratios["ours/diffusers"]) == {"forward", "forward_backward"}
    assert "diffsynth" in dit["implementations"] or dit["unavailable"]["diffsynth"]
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


def test_cpu_memory_worker_runs_in_its_own_process():
    args = speed.parse_args(["--device", "cpu", "--size", "tiny"])
    spec = speed.sampling_configs(speed.SIZES["tiny"])[0]
    row = speed.run_config(spec, args)
    assert "error" not in row, row
    assert row["peak_bytes"] > 0 and row["step_s"] > 0 and row["decode_s"] > 0


def test_train_flops_formula():
    """One frozen and one trainable linear layer plus one attention product, counted by hand."""
    frozen, trainable = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 2, bias=False)
    frozen.requires_grad_(False)
    net = torch.nn.Sequential(frozen, trainable)
    x = torch.randn(3, 8)
    with speed.FlopCounter() as flops:
        net(x)
        q = torch.randn(1, 2, 5, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert flops.flops == {"frozen": 2 * 3 * 8 * 4, "trainable": 2 * 3 * 4 * 2, "attention": 2 * 2 * 5 * 5 * 8}
    assert flops.train_step == 4 * 3 * 8 * 4 + 6 * 3 * 4 * 2 + 3 * 2 * 2 * 5 * 5 * 8


def test_vae_decode_bands_keep_the_shape():
    vae = speed.build(lambda: model.FluxVAE(speed.SIZES["tiny"].vae_config()), "cpu", torch.float32, seed=0)
    latent = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        whole, one = speed.decode_in_bands(vae, latent)
        banded, bands = speed.decode_in_bands(vae, latent, limit=1000)
    assert one == 1 and bands > 1 and banded.shape == whole.shape == (1, 3, 64, 64)
