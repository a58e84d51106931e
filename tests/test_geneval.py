"""bench/geneval.py: GenEval's rules on hand-made detections, the detector's post-processing geometry, and a tiny
end-to-end run (tiny L2P checkpoint, random Mask2Former and CLIP judges built here) with resumption."""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import convert
import model
from bench import evalgen, geneval
from bench.geneval import evaluate_image, kept_objects, relative_position
from tiny import give_head_an_output, make_tiny_zimage_repo


def det(name, score=0.95, box=(0, 0, 10, 10), color=None):
    d = {"class": name, "score": score, "box": list(box)}
    if color is not None:
        d["color"] = color
    return d


SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
       "prompt": "a photo of a cat and a dog"}
COUNTING = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
            "prompt": "a photo of two cats"}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
POSITION = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a cat left of a dog"}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                               {"class": "bus", "count": 1, "color": "blue"}],
              "prompt": "a photo of a red car and a blue bus"}


# ----------------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------------

def test_single_and_two_object_need_a_detection_above_0_3():
    assert evaluate_image(SINGLE, [det("cat", 0.31)]) == (True, "")
    assert evaluate_image(SINGLE, [det("cat", 0.3)]) == (False, "expected cat >= 1, found 0")  # strictly above
    assert evaluate_image(SINGLE, [det("dog", 0.99)])[0] is False
    assert evaluate_image(TWO, [det("dog", 0.5), det("cat", 0.4)]) == (True, "")
    assert evaluate_image(TWO, [det("cat", 0.9), det("dog", 0.2)]) == (False, "expected dog >= 1, found 0")


def test_counting_uses_0_9_and_the_exclude_clause_caps_the_count():
    cats = lambda *scores: [det("cat", s) for s in scores]
    assert evaluate_image(COUNTING, cats(0.95, 0.92)) == (True, "")
    assert evaluate_image(COUNTING, cats(0.95, 0.92, 0.5)) == (True, "")  # 0.5 does not count at 0.9
    assert evaluate_image(COUNTING, cats(0.95, 0.85)) == (False, "expected cat >= 2, found 1")
    assert evaluate_image(COUNTING, cats(0.95, 0.92, 0.91)) == (False, "expected cat < 3, found 3")
    # the same detections under a non-counting tag use 0.3
    assert evaluate_image({**COUNTING, "tag": "two_object"}, cats(0.95, 0.85)) == (True, "")


def test_exclude_rule_and_the_cap_of_16_objects_per_class():
    dogs = [det("dog", 0.4 + i / 100) for i in range(20)]
    objects = kept_objects(dogs + [det("cat", 0.2)], "single_object")
    assert list(objects) == ["dog"] and len(objects["dog"]) == 16
    assert [d["score"] for d in objects["dog"]] == sorted((d["score"] for d in dogs), reverse=True)[:16]
    no_dogs = {**SINGLE, "exclude": [{"class": "dog", "count": 1}]}
    assert evaluate_image(no_dogs, [det("cat"), det("dog", 0.31)]) == (False, "expected dog < 1, found 1")
    assert evaluate_image(no_dogs, [det("cat"), det("dog", 0.29)]) == (True, "")
    at_most_16 = {**SINGLE, "exclude": [{"class": "dog", "count": 17}]}
    assert evaluate_image(at_most_16, [det("cat")] + dogs)[0] is True  # 20 dogs, but only 16 are ever counted
    at_most_15 = {**SINGLE, "exclude": [{"class": "dog", "count": 16}]}
    assert evaluate_image(at_most_15, [det("cat")] + dogs) == (False, "expected dog < 16, found 16")


def test_colors_look_at_the_most_confident_objects_only():
    assert evaluate_image(COLORS, [det("car", 0.9, color="red")]) == (True, "")
    reason = "expected red car >= 1, found blue"
    assert evaluate_image(COLORS, [det("car", 0.9, color="blue"), det("car", 0.8, color="red")]) == (False, reason)
    assert evaluate_image(COLORS, [det("car", 0.2, color="red")]) == (False, "expected car >= 1, found 0")
    with pytest.raises(ValueError, match="needs the 'color'"):
        evaluate_image(COLORS, [det("car", 0.9)])


def test_color_attr_binds_each_colour_to_its_object():
    assert evaluate_image(COLOR_ATTR, [det("car", color="red"), det("bus", color="blue")]) == (True, "")
    correct, reason = evaluate_image(COLOR_ATTR, [det("car", color="blue"), det("bus", color="red")])
    assert not correct and reason == "expected red car >= 1, found blue; expected blue bus >= 1, found red"


def test_relative_position_margin():
    a = (0, 0, 10, 10)
    assert relative_position(a, (12, 0, 22, 10)) == {"left of"}
    assert relative_position((12, 0, 22, 10), a) == {"right of"}
    assert relative_position(a, (0, 20, 10, 30)) == {"above"}
    assert relative_position((0, 20, 10, 30), a) == {"below"}
    assert relative_position(a, (20, 20, 30, 30)) == {"left of", "above"}
    # centre offset 4.2 px, margin 0.1 x (10 + 10) = 2 px: 2.2 / 4.2 > 0.5 holds, 1.8 / 3.8 < 0.5 does not
    assert relative_position(a, (4.2, 0, 14.2, 10)) == {"left of"}
    assert relative_position(a, (3.8, 0, 13.8, 10)) == set()
    assert relative_position(a, (1.5, 0, 11.5, 10)) == set()  # within the margin: no relation at all


def test_position_rule():
    dog = det("dog", box=(12, 0, 22, 10))
    assert evaluate_image(POSITION, [dog, det("cat", box=(0, 0, 10, 10))]) == (True, "")
    assert evaluate_image(POSITION, [det("dog", box=(3.8, 0, 13.8, 10)), det("cat", box=(0, 0, 10, 10))]) == (
        False, "expected cat left of target, found no clear relation")  # 3.8 px apart: inside the 0.1 margin
    assert evaluate_image(POSITION, [dog, det("cat", box=(24, 0, 34, 10))]) == (
        False, "expected cat left of target, found right of")
    assert evaluate_image(POSITION, [det("cat", box=(0, 0, 10, 10))]) == (
        False, "expected dog >= 1, found 0; no target for cat to be left of")
    # only the most confident cat is placed: a second, misplaced one does not matter
    assert evaluate_image(POSITION, [dog, det("cat", 0.9, (0, 0, 10, 10)), det("cat", 0.8, (24, 0, 34, 10))])[0]


def test_summary_is_the_mean_of_task_accuracies():
    results = [{"index": 0, "tag": "single_object", "correct": True}, {"index": 0, "tag": "single_object",
                                                                         "correct": True}]
    results += [{"index": 1 + i // 2, "tag": "counting", "correct": i == 0} for i in range(4)]
    summary = geneval.summarize(results)
    assert summary["tasks"]["single_object"]["accuracy"] == 1.0 and summary["tasks"]["counting"]["accuracy"] == 0.25
    assert summary["overall"] == 0.625  # not the image mean, 0.5
    assert summary["correct_images"] == 0.5 and summary["prompts_with_a_correct_image"] == 2 / 3


def test_metadata_is_checked(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(POSITION) + "\n\n" + json.dumps(COUNTING) + "\n")
    assert geneval.read_metadata(path) == [POSITION, COUNTING]
    bad = {**POSITION, "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}
    for row, message in ((bad, "index of an earlier include"), ({**SINGLE, "tag": "size"}, "expected a 'tag'"),
                         ({**COLORS, "include": [{"class": "car", "count": 1, "color": "teal"}]}, "not one of")):
        path.write_text(json.dumps(SINGLE) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(SystemExit, match=f"m.jsonl:2: .*{message}"):
            geneval.read_metadata(path)


def test_detector_labels_map_to_geneval_names():
    assert [geneval.geneval_name(n) for n in ("mouse", "remote", "keyboard", "Dining_Table", "cell phone")] == [
        "computer mouse", "tv remote", "computer keyboard", "dining table", "cell phone"]


# ----------------------------------------------------------------------------------------------------------------
# Detector post-processing and crops (stubbed network, real image processor)
# ----------------------------------------------------------------------------------------------------------------

class StubDetector:
    """Fixed Mask2Former outputs: query 0 = "cat" (p ~ 0.98) with the given mask logits, query 1 = "dog" (p ~ 0.25)."""
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, mask_logits):
        self.mask_logits = mask_logits

    def __call__(self, pixel_values, pixel_mask):
        self.seen = tuple(pixel_values.shape)
        classes = torch.full((len(pixel_values), 2, 3), -10.0)
        classes[:, 0, 0] = 4.0  # cat
        classes[:, 1, 1], classes[:, 1, 2] = 0.0, 1.1  # dog at p = 0.25, the rest "no object"
        return SimpleNamespace(class_queries_logits=classes, masks_queries_logits=self.mask_logits)


def test_detect_crops_batch_padding_and_boxes_the_mask():
    """Image A (64 x 64) is padded to B's 64 x 96 in the batch; B (96 x 48) is stretched to 96 x 64 by the processor
    (it resizes to multiples of 32). Masks must be cut to each image's own area before going back to its size."""
    from transformers import Mask2FormerImageProcessor

    a, b = Image.new("RGB", (64, 64)), Image.new("RGB", (96, 48))
    logits = torch.full((2, 2, 16, 24), -20.0)  # masks at 1/4 of the 64 x 96 batch input
    logits[0, 0, 8:12, 12:16] = 20.0  # A: bottom right of its 16 x 16 valid area
    logits[1, 0, 8:12, 20:24] = 20.0  # B: bottom right
    stub = StubDetector(logits)
    found = geneval.detect(stub, Mask2FormerImageProcessor(), {0: "cat", 1: "dog"}, [a, b], size=48, min_score=0.3)
    assert stub.seen == (2, 3, 64, 96) and [len(f) for f in found] == [1, 1]  # the dog (0.25) is dropped
    [cat_a], [cat_b] = found
    assert cat_a["class"] == "cat" and cat_a["box"] == [48, 32, 64, 48] and cat_a["mask"].shape == (64, 64)
    assert cat_b["box"] == [80, 24, 96, 36] and cat_b["mask"].shape == (48, 96)
    p_cat = torch.tensor([4.0, -10, -10]).softmax(0)[0].item()
    # score = class probability x mean mask probability (just under 1: the block's rim has logits near +5)
    assert p_cat - 0.02 < cat_a["score"] < p_cat and 240 <= cat_a["mask"].sum() <= 16 * 16


def test_masked_crop_greys_the_background():
    image = Image.new("RGB", (8, 8), (0, 0, 255))
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:6] = True
    image.paste((255, 0, 0), (2, 2, 6, 4))
    crop = np.asarray(geneval.masked_crop(image, {"box": [1, 1, 6, 4], "mask": mask}))
    assert crop.shape == (3, 5, 3)
    assert (crop[1:, 1:] == (255, 0, 0)).all() and (crop[0] == (0x99, 0x99, 0x99)).all()


# ----------------------------------------------------------------------------------------------------------------
# End to end: tiny L2P checkpoint and tiny random judges, all built here
# ----------------------------------------------------------------------------------------------------------------

LABELS = ["person", "cat", "dog", "mouse", "car"]  # "mouse" is GenEval's "computer mouse"
ROWS = [SINGLE,
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
        {"tag": "position", "include": [{"class": "cat", "count": 1},
                                        {"class": "computer mouse", "count": 1, "position": ["left of", 0]}],
         "prompt": "a photo of a computer mouse left of a cat"}]


def save_tiny_detector(folder):
    """A random Mask2Former (Swin backbone) with a few COCO labels; class biases make some queries confident."""
    from transformers import Mask2FormerConfig, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               num_queries=10, dim_feedforward=32, num_labels=len(LABELS),
                               id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                               use_pretrained_backbone=False)
    torch.manual_seed(0)
    detector = geneval.mask2former_class()(config)
    with torch.no_grad():  # confident, query-dependent classes, mostly cat and mouse (random masks score ~0.5)
        detector.class_predictor.weight.normal_(std=3 / config.hidden_dim ** 0.5)
        detector.class_predictor.bias.copy_(torch.tensor([0.0, 6.0, 0.0, 6.0, 0.0, 0.0]))
    detector.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 1333}).save_pretrained(folder)
    return folder


def save_tiny_clip(folder):
    """A random CLIP with a byte-level tokenizer (no merges) and 32 px image processor, all built offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(bytes_to_unicode().values())})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    repo = make_tiny_zimage_repo(root / "Z-Image-Turbo")
    ckpt = root / "l2p.safetensors"
    convert.main(["--src", str(repo), "--out", str(ckpt), "--recipe", "paper"])
    give_head_an_output(ckpt)
    metadata = root / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return SimpleNamespace(repo=repo, ckpt=ckpt, metadata=metadata, detector=save_tiny_detector(root / "m2f"),
                           clip=save_tiny_clip(root / "clip"))


@pytest.fixture
def generated(monkeypatch):
    """Counts the images model.generate makes, by seed."""
    seeds = []
    real = model.generate

    def spy(dit, cap, mask, batch_seeds, *args, **kwargs):
        seeds.extend(batch_seeds)
        return real(dit, cap, mask, batch_seeds, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seeds


def run(setup, out, *extra):
    geneval.main(["--metadata", str(setup.metadata), "--out", str(out), "--ckpt", str(setup.ckpt),
                  "--text-encoder", str(setup.repo), "--detector", str(setup.detector), "--clip", str(setup.clip),
                  "--images-per-prompt", "2", "--resolution", "32", "--steps", "1", "--dtype", "fp32",
                  "--device", "cpu", "--detector-size", "64", "--batch-size", "3", "--seed", "7", *extra])


def snapshot(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_end_to_end_layout_resume_and_summary(setup, generated, tmp_path):
    out = tmp_path / "run"
    run(setup, out)
    assert sorted(generated) == [7 + i * 2 + k for i in range(3) for k in range(2)]
    for i, row in enumerate(ROWS):  # GenEval's own layout
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == row
        for k in range(2):
            assert Image.open(out / f"{i:05d}" / "samples" / f"{k:04d}.png").size == (32, 32)
        saved = json.loads((out / "scores" / f"{i:05d}.json").read_text())
        assert len(saved["images"]) == 2 and all(isinstance(r["correct"], bool) for r in saved["images"])
        assert all(set(d) >= {"class", "score", "box"} for r in saved["images"] for d in r["detections"])
    detections = [d for i in range(3) for r in json.loads((out / "scores" / f"{i:05d}.json").read_text())["images"]
                  for d in r["detections"]]
    assert detections and {d["class"] for d in detections} <= {"person", "cat", "dog", "computer mouse", "car"}
    assert any("color" in d for d in detections)  # the colour rule ran
    results = json.loads((out / "results.json").read_text())
    assert results["generation"]["model"] == "l2p" and results["generation"]["steps"] == 1
    assert results["generation"]["guidance"] == 2.0 and results["generation"]["shift"] == 3.0
    assert results["judges"]["detector"] == str(setup.detector.resolve()) and results["images"] == 6
    assert list(results["tasks"]) == ["single_object", "colors", "position"] and not results["partial"]
    assert results["overall"] == pytest.approx(np.mean([t["accuracy"] for t in results["tasks"].values()]))
    summary = (out / "results.md").read_text()
    assert "l2p.safetensors" in summary and "1 Euler steps" in summary and str(setup.clip.resolve()) in summary

    before = snapshot(out)
    generated.clear()
    run(setup, out)  # nothing left to do: no image made, no score recomputed, same results
    assert generated == [] and snapshot(out) == before

    lost = out / "00001" / "samples" / "0001.png"
    old = np.asarray(Image.open(lost), dtype=int)
    lost.unlink()
    run(setup, out)
    assert generated == [7 + 1 * 2 + 1]  # only the lost image, with its own seed
    assert np.abs(np.asarray(Image.open(lost), dtype=int) - old).max() <= 1

    (out / "scores" / "00000.json").unlink()
    run(setup, out, "--stage", "score")  # the judges are deterministic: the rescored prompt scores the same
    assert json.loads((out / "results.json").read_text()) == results


def test_settings_and_missing_images_are_refused(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, "--stage", "generate", "--limit", "1")
    with pytest.raises(SystemExit, match="other settings.*steps: 1 -> 3"):
        run(setup, out, "--stage", "generate", "--steps", "3")
    with pytest.raises(SystemExit, match="00001/metadata.jsonl is missing"):
        run(setup, out, "--stage", "score")
    run(setup, out, "--stage", "score", "--limit", "1")
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] and results["prompts"] == 1
    assert "Partial run: 1 of 3 prompts" in (out / "results.md").read_text()


def test_latent_source_uses_its_vae_and_scheduler_shift(setup, generated, tmp_path):
    out = tmp_path / "latent"
    geneval.main(["--metadata", str(setup.metadata), "--out", str(out), "--latent", str(setup.repo),
                  "--stage", "generate", "--limit", "1", "--images-per-prompt", "1", "--resolution", "32",
                  "--dtype", "fp32", "--device", "cpu"])
    settings = json.loads((out / "generation.json").read_text())
    assert (settings["model"], settings["steps"], settings["guidance"], settings["shift"]) == ("latent", 8, 1.0, 3.0)
    assert generated == [0] and Image.open(out / "00000" / "samples" / "0000.png").size == (32, 32)
    with pytest.raises(SystemExit, match="exactly one of --ckpt"):
        geneval.main(["--metadata", str(setup.metadata), "--out", str(out), "--stage", "generate"])
    with pytest.raises(SystemExit, match="carries no text encoder"):
        geneval.main(["--metadata", str(setup.metadata), "--out", str(out), "--stage", "generate",
                      "--ckpt", str(setup.ckpt)])


def test_latent_defaults_are_the_repos_own_sampler(setup, tmp_path):
    """--latent takes its steps, CFG and shift from model.source_sampler_settings: Z-Image base (shift 6) samples
    with 50 steps and CFG 5.0 (w = 4), not Turbo's 8 steps without CFG; flags still win."""
    base = tmp_path / "Z-Image"
    for part in setup.repo.iterdir():
        if part.name != "scheduler":
            (base / part.name).parent.mkdir(exist_ok=True)
            (base / part.name).symlink_to(part)
    (base / "scheduler").mkdir()
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 6.0}))
    parser = argparse.ArgumentParser()
    evalgen.add_generation_args(parser)
    settings = evalgen.sampler_settings(parser.parse_args(["--latent", str(base), "--resolution", "32"]), 1)
    assert (settings["steps"], settings["guidance"], settings["shift"]) == (50, 5.0, 6.0)
    settings = evalgen.sampler_settings(parser.parse_args(["--latent", str(base), "--resolution", "32", "--steps", "3",
                                                           "--guidance", "1"]), 1)
    assert (settings["steps"], settings["guidance"], settings["shift"]) == (3, 1.0, 6.0)
    with pytest.raises(SystemExit, match="multiple of 16"):
        evalgen.sampler_settings(parser.parse_args(["--latent", str(base), "--resolution", "24"]), 1)
