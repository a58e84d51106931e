"""bench/shapes.py end to end at a reduced size: every stage runs through the real scripts and leaves its files.
Quality thresholds live in the benchmark itself, not here."""

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import shapes  # noqa: E402

TINY = replace(shapes.QUICK, corpus_prompts=12, corpus_seeds=1, pixel_steps=24, pixel_batch=4, curve_every=12,
               eval_prompts=6, eval_seeds=1, sample_steps=2, head_steps=20)


def test_every_stage_runs_from_the_shipped_source_and_the_l2p_loss_falls(tmp_path):
    results = shapes.main(["--runs", str(tmp_path), "--real-data"], plan=TINY)
    rows = (tmp_path / "corpus" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == TINY.corpus_prompts * TINY.corpus_seeds
    real = [json.loads(line) for line in (tmp_path / "corpus_real" / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in real] == [json.loads(line)["prompt"] for line in rows]  # the same prompts, renders
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["overall"]) == {"ground truth", "vae", "source", "l2p", "scratch", "l2p_real"}
    assert saved["overall"]["ground truth"] >= 0.98
    assert saved["source"]["sha256"] and saved["source"]["shapeeval_full_protocol"] >= 0.5
    assert [p["step"] for p in saved["curve"]] == [0, 12, 24]  # step 0: the converted model, before training
    assert all(0 < p[f"{name}_val_loss"] < 10 and 0 <= p[f"{name}_prompt_effect"] < 10
               for p in saved["curve"] for name in ("l2p", "scratch", "l2p_real"))
    # scratch trains on the images noised (its training-state loss is its x0 loss); the lifted L2P on its sampler's
    assert all(p["scratch_train_state_x0_loss"] == pytest.approx(p["scratch_val_x0_loss"], rel=1e-4) and
               abs(p["l2p_train_state_x0_loss"] / p["l2p_val_x0_loss"] - 1) > 1e-2 for p in saved["curve"])
    assert 0 < saved["trainable_fraction"]["l2p"] < 1
    assert set(saved["code"]) == set(saved["seconds"]) - {"total"}  # the commit of the code that ran each stage
    assert set(saved["code"].values()) == {shapes.toysource.commit(tmp_path)}
    assert Image.open(tmp_path / "grid.png").size[0] > 4 * 64 and Image.open(tmp_path / "curve.png").size == (1100, 420)
    assert saved["recipe"] == "lift" and set(saved["ablation"]) == {"lift"}
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run_l2p-lift" / "log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2])
    report = (tmp_path / "results.md").read_text()
    assert "| overall |" in report and "| lift | 0 |" in report
    # the lifted L2P's training-state loss, written out: the images' in-span part replaced by s basis^T (their VAE
    # latent tokens), noised with the metric's fixed noise, the error of x - sigma v (the whole decode) against them
    init, source = tmp_path / "l2p-lift-init.safetensors", shapes.toysource.SOURCE
    net, vae = shapes.model.load_model(init, dtype=torch.float32).eval(), shapes.model.load_vae(source)
    images = shapes.toysource.render(shapes.shapeworld.make_scenes(2, 3))
    cap, mask = torch.randn(2, 5, net.cfg.cap_feat_dim), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        tokens = shapes.model.patchify(vae.encode(images), 2).double()
        patches = shapes.model.patchify(images.double(), 16)
        basis, scale = net.lift.basis.double(), net.lift.scale.double()
        state = scale * tokens @ basis + patches - patches @ basis.T @ basis
        start = shapes.model.unpatchify(state, 16, shapes.SIZE, shapes.SIZE).float()
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        errors = [(x - s * net(x, torch.full((2,), s), cap, mask, span_detail=True) - images).square().mean()
                  for s, x in ((s, (1 - s) * start + s * noise) for s in shapes.VAL_SIGMAS)]
    metrics = [shapes.validation_metrics(init, images, cap, mask, cap[:1], vae, states)[3] for states in (True, False)]
    assert metrics[0] == pytest.approx(float(torch.stack(errors).mean()), rel=1e-3)
    assert abs(metrics[0] / metrics[1] - 1) > 1e-2
    # a run with more train.py flags: its own curve; the states it trains on decide whether it gets the VAE
    shallow = shapes.main(["--runs", str(tmp_path), "--name", "shallow", "--train-flags",
                           "--trainable shallow --states image"], plan=TINY)
    assert set(shallow["ablation"]) == {"lift", "shallow"} and shallow["curve"][-1]["step"] == 24
    assert shallow["trainable_fraction"]["l2p"] > saved["trainable_fraction"]["l2p"]  # the DiT's shallow blocks too

    longer = shapes.main(["--runs", str(tmp_path), "--real-data", "--steps", "36"], plan=TINY)  # the curve goes on
    assert [p["step"] for p in longer["curve"]] == [0, 12, 24, 36]
    assert longer["curve"][:3] == saved["curve"]  # the points already scored are kept, not redone
    assert longer["code"].items() >= saved["code"].items()  # resumed under the same commit: named once
    with pytest.raises(SystemExit, match="another plan, source or --seed"):  # its stages were made with seed 0
        shapes.main(["--runs", str(tmp_path), "--seed", "1"], plan=TINY)
    log = (tmp_path / "run_l2p-lift" / "log.jsonl").read_text().splitlines()
    assert max(json.loads(line).get("step") or 0 for line in log) == 36


def test_flags_for_the_scripts_are_checked_before_any_stage(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--convert-flags / --train-flags: No closing quotation"):
        shapes.parse_args(["--name", "x", "--train-flags", "--lr 'oops"])
    for flags in (["--train-flags", "--lr nan"], ["--convert-flags", "--head-steps -1"]):
        with pytest.raises(SystemExit) as stopped:
            shapes.parse_args(["--name", "x", *flags])
        assert stopped.value.code == 2  # the script's own parser refused it
    assert "--lr nan: must be finite" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file: pass a folder"):
        shapes.main(["--runs", str(tmp_path / "file")])


def test_an_altered_or_missing_source_is_refused(tmp_path):
    source = tmp_path / "toy-source"
    shutil.copytree(shapes.toysource.SOURCE, source)
    assert shapes.toysource.check_source(source)["shapeeval"]["overall"] >= 0.5
    weights = source / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="differ from its manifest.*transformer/diffusion_pytorch_model.safetensors"):
        shapes.toysource.check_source(source)
    (source / "manifest.json").unlink()
    with pytest.raises(SystemExit, match="no trained toy source"):
        shapes.main(["--runs", str(tmp_path / "runs")], plan=TINY, source=source)


@pytest.mark.parametrize("family, dit, caption_tokens", [
    ("zimage", shapes.toysource.TOY_DIT, 512),
    ("flux2", shapes.toysource.TOY_FLUX2_DIT, shapes.toysource.FLUX2_CAPTION_TOKENS)])
def test_each_shipped_source_matches_its_manifest_and_loads_in_its_published_layout(family, dit, caption_tokens):
    source = shapes.toysource.SOURCES[family]
    manifest = shapes.toysource.check_source(source)  # every file against its sha256
    assert manifest["shapeeval"]["overall"] >= 0.5 and manifest["vae_reconstructions"]["overall"] >= 0.95
    assert shapes.model.open_checkpoint(source).cfg == dit
    encoder = shapes.model.load_text_encoder(source, dtype=torch.float32)  # the caption length its files declare
    assert encoder.family == family and encoder.max_length == caption_tokens


def test_a_toy_flux2_source_trains_into_klein_s_layout_on_the_features_it_will_be_read_with(tmp_path):
    """A few steps of the toy FLUX.2 recipe: the source written in FLUX.2 [klein]'s published layout loads through
    model.py as a klein repo (its short caption length from its tokenizer_config.json), the features it trained on
    are the ones model.TextEncoder reads from those files, every stage of bench/shapes.py --family flux2 runs from
    it, and its manifest guards the files."""
    from transformers import AutoTokenizer

    toysource, model = shapes.toysource, shapes.model
    micro = toysource.SourcePlan(vae_steps=2, vae_batch=4, scenes=32, steps=2, batch=4, eval_prompts=6, eval_seeds=1,
                                 sample_steps=2, save_every=1)
    target = tmp_path / "toy-source-flux2"
    manifest = toysource.train_source(micro, tmp_path / "work", "cpu", 0, target, "flux2")
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    assert model.open_checkpoint(target).cfg == toysource.TOY_FLUX2_DIT
    vae = model.load_vae(target)  # its BatchNorm statistics normalise the packed latent of the toy's scenes
    with torch.no_grad():
        z = vae.encode(toysource.render(shapes.shapeworld.make_scenes(64, 5)))
    assert isinstance(vae, model.Flux2VAE) and z.mean().abs() < 0.2 and 0.8 < z.std() < 1.25
    encoder = model.load_text_encoder(target, dtype=torch.float32)
    assert encoder.family == "flux2" and encoder.max_length == toysource.FLUX2_CAPTION_TOKENS
    captions = ["a red circle", ""]
    cap, mask = encoder.encode(captions)
    ids = toysource.tokenize(AutoTokenizer.from_pretrained(target / "tokenizer"), captions, "flux2")
    with torch.no_grad():
        trained_on, _ = toysource.encode(encoder.model, [ids[c] for c in captions], encoder.tokenizer.pad_token_id,
                                         "cpu", "flux2")
    assert cap.shape == (2, toysource.FLUX2_CAPTION_TOKENS, 192) and mask.all() and torch.equal(cap, trained_on)
    assert toysource.check_source(target)["files"] == manifest["files"]
    runs = tmp_path / "runs"  # the head-input ablation's form: an init converted with more flags, under a name
    with pytest.raises(SystemExit, match="--name"):
        shapes.main(["--family", "flux2", "--runs", str(runs), "--convert-flags", "--head-tokens norm"], plan=TINY,
                    source=target)
    results = shapes.main(["--family", "flux2", "--runs", str(runs), "--convert-flags", "--head-tokens norm", "--name",
                           "tokens-norm"], plan=TINY, source=target)
    assert [p["step"] for p in results["curve"]] == [0, 12, 24] and results["recipe"] == "lift"  # every stage ran
    assert set(results["overall"]) == {"ground truth", "vae", "source", "l2p", "scratch"}
    assert set(results["ablation"]) == {"tokens-norm"} and results["name"] == "tokens-norm"
    named = ["results-tokens-norm.md", "results-tokens-norm.json", "grid-tokens-norm.png", "grid_step0-tokens-norm.png",
             "curve-tokens-norm.png"]  # the default recipe's plain names stay free
    assert all((runs / name).exists() for name in named) and not (runs / "results.json").exists()
    assert model.open_checkpoint(runs / "l2p-tokens-norm-init.safetensors").cfg.head_token_norm
    assert 0 < results["trainable_fraction"]["l2p"] < 1
    again = shapes.main(["--family", "flux2", "--eval-source", "--runs", str(runs)], source=target)
    for key in ("shapeeval", "vae_reconstructions"):  # --eval-source scores it as its manifest says it scored
        assert again[key]["overall"] == pytest.approx(manifest[key]["overall"], abs=0.03), key
    (target / "vae" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="differ from its manifest.*vae/config.json"):
        toysource.check_source(target)


def test_a_run_with_other_flags_needs_a_name_of_its_own():
    for argv in (["--train-flags", "--lr 1e-4"], ["--convert-flags", "--head-tokens norm", "--name", "paper"],
                 ["--recipe", "paper", "--name", "lift"]):
        with pytest.raises(SystemExit, match="--name"):
            shapes.parse_args(argv)
    assert shapes.parse_args(["--train-flags", "--lr 1e-4", "--name", "low-lr"]).name == "low-lr"


def test_eval_prompts_are_distinct_and_balanced_over_tasks():
    scenes = shapes.toysource.eval_scenes(60, seed=0)
    captions = [s.caption for s in scenes]
    assert len(set(captions)) == len(captions)
    counts = {task: sum(s.task == task for s in scenes) for task in shapes.shapeworld.TASKS}
    # 10 per task, except where a task has fewer captions: 3 shapes for one object, 3 x 2 ordered pairs for two
    assert counts == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 10, "position": 10,
                      "color_attr": 10}
    assert [s.task for s in scenes[:6]] == list(shapes.shapeworld.TASKS)


def test_the_prompt_effect_sees_a_head_that_has_gone_deaf_to_the_tokens(tmp_path):
    torch.manual_seed(0)
    net = shapes.model.ZImageDiT(shapes.model.l2p_config(shapes.toysource.TOY_DIT, 16, shapes.HEAD_WIDTH))
    torch.nn.init.normal_(net.local_decoder.out_conv.weight, std=0.1)  # a fresh head predicts 0: give it an output
    images = torch.rand(4, 3, shapes.SIZE, shapes.SIZE) * 2 - 1
    width = shapes.toysource.TOY_DIT.cap_feat_dim
    cap, empty = torch.randn(4, 7, width), torch.randn(1, 3, width)
    mask = torch.ones(4, 7, dtype=torch.bool)

    def metrics(name):
        path = tmp_path / f"{name}.safetensors"
        shapes.model.write_safetensors(path, {k: v.detach().contiguous() for k, v in net.state_dict().items()},
                                       {"format": "l2p", "l2p_patch": "16"})
        return shapes.validation_metrics(path, images, cap, mask, empty, vae=None, source_states=False)

    loss, hearing, x0_loss, train_state_x0_loss = metrics("hearing")
    with torch.no_grad():  # the bottleneck's token inputs cut: the only way the caption reaches the output
        net.local_decoder.bottleneck[0].weight[:, -shapes.toysource.TOY_DIT.dim:] = 0
    deaf_loss, deaf, _, _ = metrics("deaf")
    assert hearing > 0.01 and deaf == 0.0
    assert 0 < loss < 10 and 0 < deaf_loss < 10
    # an unlifted model trains on the images noised: x - sigma v - x0 = sigma (eps - x0 - v), the x0 loss itself
    assert train_state_x0_loss == pytest.approx(x0_loss, rel=1e-4)
