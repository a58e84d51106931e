"""bench/dpg.py: DPG-Bench's rules on hand-made answers, its file formats, and a tiny end-to-end run (tiny L2P
checkpoint, random ViLT / BLIP / LLaVA judges built here) with resumption."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import convert
import model
from bench import dpg
from bench.dpg import Question, question_scores, score_prompt
from tiny import give_head_an_output, make_tiny_zimage_repo

HEADER = ",".join(dpg.QUESTION_COLUMNS)
# Two items in DPG-Bench's csv format (the second's rows are not contiguous, and its question 3 has two parents).
CSV = f"""{HEADER}
1,"A red truck, parked",truck,1,0,entity,whole,entity - whole (truck),Is there a truck?
1,"A red truck, parked",red,2,1,attribute,color,"attribute - color (truck, red)",Is the truck red?
partiprompts7,A cat left of a dog,cat,1,0,entity,whole,entity - whole (cat),Is there a cat?
1,"A red truck, parked",parked,3,1,other,state,"other - state (truck, parked)",Is the truck parked?
partiprompts7,A cat left of a dog,dog,2,0,entity,whole,entity - whole (dog),Is there a dog?
partiprompts7,A cat left of a dog,left,3,"1,2",relation,spatial,"relation - spatial (cat, dog, left)",Is the cat left?
"""
PROMPTS = {"1": "A red truck, parked on the beach at dusk.", "partiprompts7": "A cat left of a dog."}


def q(id, parents=(0,), category="entity", detailed="whole"):
    return Question(id, f"question {id}?", list(parents), category, detailed)


# ----------------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------------

def test_only_yes_counts():
    yes = ["yes", "Yes", "YES.", " yes", "yes, there is a truck", "Yes!"]
    no = ["no", "No.", "", "yesterday", "maybe yes", "2", "y"]
    assert [dpg.is_yes(a) for a in yes] == [True] * len(yes) and [dpg.is_yes(a) for a in no] == [False] * len(no)


def test_a_child_of_a_no_scores_zero():
    questions = [q(1), q(2, [1]), q(3, [2]), q(4, [0]), q(5, [1, 4])]
    assert question_scores(questions, ["yes"] * 5) == [1, 1, 1, 1, 1]
    assert question_scores(questions, ["no", "yes", "yes", "yes", "yes"]) == [0, 0, 0, 1, 0]  # 3 via its parent 2
    assert question_scores(questions, ["yes", "no", "yes", "yes", "yes"]) == [1, 0, 0, 1, 1]
    assert question_scores(questions, ["yes", "yes", "yes", "no", "yes"]) == [1, 1, 1, 0, 0]  # either parent
    assert question_scores(questions, ["yes", "Yes.", "red", "no", "yes"]) == [1, 1, 0, 0, 0]


def test_prompt_score_is_the_mean_over_questions_then_images():
    questions = [q(1), q(2, [1]), q(3)]
    answers = [["yes", "yes", "no"], ["yes", "yes", "yes"], ["no", "yes", "no"], ["no", "no", "yes"]]
    result = score_prompt(questions, answers)
    assert result["tile_scores"] == pytest.approx([2 / 3, 1, 0, 1 / 3]) and result["score"] == pytest.approx(0.5)


def test_summary_is_x100_with_raw_yes_shares_per_category():
    a = [vars(q(1)), vars(q(2, [1], "attribute", "color"))]
    b = [vars(q(1, [0], "global", "")), vars(q(2, [0], "relation", "spatial"))]
    results = [{"score": 0.25, "questions": a, "answers": [["no", "yes"], ["no", "no"]]},
               {"score": 1.0, "questions": b, "answers": [["yes", "yes"], ["yes", "no"]]}]
    summary = dpg.summarize(results)
    assert summary["score"] == pytest.approx(62.5)
    # the child answered "yes" under a "no" parent still counts for its category (before the dependency rule)
    assert summary["categories"] == pytest.approx({"global": 100.0, "entity": 0.0, "attribute": 50.0,
                                                   "relation": 50.0})
    assert list(summary["categories"]) == ["global", "entity", "attribute", "relation"]  # DPG's order
    assert summary["categories_detailed"]["attribute - color"] == pytest.approx(50.0)
    assert summary["prompts"] == 2 and summary["questions"] == 4


def test_question_file(tmp_path):
    path = tmp_path / "dpg_bench.csv"
    path.write_text(CSV)
    items = dpg.read_questions(path)
    assert list(items) == ["1", "partiprompts7"]
    assert [x.id for x in items["1"]] == [1, 2, 3] and items["1"][1].question == "Is the truck red?"
    assert items["partiprompts7"][2] == Question(3, "Is the cat left?", [1, 2], "relation", "spatial")
    for text, message in ((CSV.replace("category_broad", "category"), "lacks the columns \\['category_broad'\\]"),
                          (CSV.replace(",3,1,other", ",3,7,other"), "item 1 question 3 depends on \\[7\\]"),
                          (CSV.replace(",3,1,other", ",x,1,other"), "must be integers"),
                          (CSV.replace(",3,1,other", ",2,1,other"), "proposition 2 twice")):
        path.write_text(text)
        with pytest.raises(SystemExit, match=message):
            dpg.read_questions(path)


def test_prompt_files(tmp_path):
    for item, text in PROMPTS.items():
        (tmp_path / f"{item}.txt").write_text(text + "\n")
    assert dpg.read_prompts(tmp_path, ["1", "partiprompts7"]) == PROMPTS
    with pytest.raises(SystemExit, match="lacks the prompts of 1 items.*'2'"):
        dpg.read_prompts(tmp_path, ["1", "2"])


def test_grid_tiles_round_trip():
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue", "white")]
    grid = dpg.make_grid(images)
    assert grid.size == (16, 16) and grid.getpixel((12, 3)) == (0, 128, 0)  # image 1 at the top right
    assert [np.asarray(t).tolist() for t in dpg.grid_tiles(grid)] == [np.asarray(i).tolist() for i in images]


# ----------------------------------------------------------------------------------------------------------------
# End to end: tiny L2P checkpoint and tiny random judges, all built here
# ----------------------------------------------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "is", "there", "the", "a", "?"]


def bert_tokenizer(**kwargs):
    from transformers import BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = WORDS + letters + ["##" + c for c in letters]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, **kwargs), len(words)


def save_tiny_vilt(folder):
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    tokenizer, vocab_size = bert_tokenizer()
    ViltProcessor(image_processor=ViltImageProcessor(size={"shortest_edge": 32}), tokenizer=tokenizer
                  ).save_pretrained(folder)
    answers = ["yes", "no", "2"]
    config = ViltConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, image_size=32, patch_size=16, max_image_length=-1,
                        num_labels=len(answers), id2label=dict(enumerate(answers)),
                        label2id={a: i for i, a in enumerate(answers)})
    torch.manual_seed(0)
    ViltForQuestionAnswering(config).save_pretrained(folder)
    return folder


def save_tiny_blip(folder):
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tokenizer, vocab_size = bert_tokenizer(bos_token="[DEC]")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
                  ).save_pretrained(folder)
    config = BlipConfig(text_config=dict(vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=64, bos_token_id=5, sep_token_id=3, pad_token_id=0),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(folder)
    return folder


def save_tiny_llava(folder):
    """A chat VLM: CLIP vision tower + 1-layer Llama, a byte-level BPE tokenizer with <image>, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["is there a truck? is the cat left of the dog? answer yes or no"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<image>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=32, patch_size=8),
                         text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpg")
    repo = make_tiny_zimage_repo(root / "Z-Image-Turbo")
    ckpt = root / "l2p.safetensors"
    convert.main(["--src", str(repo), "--out", str(ckpt), "--recipe", "paper"])
    give_head_an_output(ckpt)
    (root / "dpg_bench.csv").write_text(CSV)
    (root / "prompts").mkdir()
    for item, text in {**PROMPTS, "99": "a prompt without questions is not part of the benchmark"}.items():
        (root / "prompts" / f"{item}.txt").write_text(text)
    return SimpleNamespace(repo=repo, ckpt=ckpt, csv=root / "dpg_bench.csv", prompts=root / "prompts",
                           vilt=save_tiny_vilt(root / "vilt"), blip=save_tiny_blip(root / "blip"),
                           llava=save_tiny_llava(root / "llava"))


@pytest.fixture
def generated(monkeypatch):
    """The seeds of the images model.generate makes."""
    seeds = []
    real = model.generate

    def spy(dit, cap, mask, batch_seeds, *args, **kwargs):
        seeds.extend(batch_seeds)
        return real(dit, cap, mask, batch_seeds, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seeds


def run(setup, out, vqa, *extra):
    dpg.main(["--prompts", str(setup.prompts), "--questions", str(setup.csv), "--out", str(out),
              "--ckpt", str(setup.ckpt), "--text-encoder", str(setup.repo), "--vqa", str(vqa), "--resolution", "32",
              "--steps", "1", "--dtype", "fp32", "--device", "cpu", "--batch-size", "3", "--seed", "5",
              "--vqa-batch-size", "5", *extra])


def snapshot(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_end_to_end_layout_resume_and_summary(setup, generated, tmp_path):
    out = tmp_path / "run"
    run(setup, out, setup.vilt)
    assert sorted(generated) == [5 + i * 4 + k for i in range(2) for k in range(4)]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1.png", "partiprompts7.png"]  # DPG's layout
    assert Image.open(out / "images" / "1.png").size == (64, 64)
    saved = json.loads((out / "scores" / "partiprompts7.json").read_text())
    assert saved["prompt"] == PROMPTS["partiprompts7"] and len(saved["answers"]) == 4
    assert all(len(a) == 3 and set(a) <= {"yes", "no", "2"} for a in saved["answers"])  # ViLT's answer vocabulary
    assert saved["score"] == score_prompt(dpg.read_questions(setup.csv)["partiprompts7"], saved["answers"])["score"]
    results = json.loads((out / "results.json").read_text())
    assert results["judge"]["model_type"] == "vilt" and results["judge"]["vqa"] == str(setup.vilt.resolve())
    assert results["generation"]["checkpoint"] == str(setup.ckpt.resolve()) and results["generation"]["seed"] == 5
    assert results["prompts"] == 2 and results["questions"] == 6 and not results["partial"]
    assert results["score"] == pytest.approx(100 * np.mean([json.loads(p.read_text())["score"]
                                                            for p in (out / "scores").glob("*.json")]))
    assert set(results["categories"]) == {"entity", "attribute", "relation", "other"}
    summary = (out / "results.md").read_text()
    assert "l2p.safetensors" in summary and "CFG c = 2.0" in summary and str(setup.vilt.resolve()) in summary

    before = snapshot(out)
    generated.clear()
    run(setup, out, setup.vilt)  # nothing left to do
    assert generated == [] and snapshot(out) == before

    lost = out / "images" / "partiprompts7.png"
    old = np.asarray(Image.open(lost), dtype=int)
    lost.unlink()
    run(setup, out, setup.vilt)
    assert sorted(generated) == [5 + 4 + k for k in range(4)]  # that prompt's four images, with their own seeds
    assert np.abs(np.asarray(Image.open(lost), dtype=int) - old).max() <= 1

    (out / "scores" / "1.json").unlink()
    run(setup, out, setup.vilt, "--stage", "score")  # deterministic judge: the same numbers again
    assert json.loads((out / "results.json").read_text()) == results


@pytest.fixture(scope="module")
def first_prompt_scored_by_vilt(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpg-vilt") / "run"
    run(setup, out, setup.vilt, "--limit", "1")
    return out


@pytest.mark.parametrize("judge", ["blip", "llava"])
def test_other_judges_rescore_and_are_named(setup, first_prompt_scored_by_vilt, tmp_path, judge):
    out = tmp_path / "run"
    shutil.copytree(first_prompt_scored_by_vilt, out)
    run(setup, out, getattr(setup, judge), "--stage", "score", "--limit", "1")
    saved = json.loads((out / "scores" / "1.json").read_text())
    assert saved["judge"]["model_type"] == judge and all(isinstance(a, str) for t in saved["answers"] for a in t)
    results = json.loads((out / "results.json").read_text())
    assert results["judge"]["model_type"] == judge and results["partial"] and 0 <= results["score"] <= 100
    assert "Partial run: 1 of 2 prompts" in (out / "results.md").read_text()
    if judge == "llava":
        assert results["judge"]["question"] == "{question} Answer yes or no. (in its chat template)"


def test_missing_grids_and_unsupported_judges_are_refused(setup, tmp_path):
    with pytest.raises(SystemExit, match="1.png is missing or broken: run --stage generate"):
        run(setup, tmp_path / "empty", setup.vilt, "--stage", "score")
    (tmp_path / "not-vqa").mkdir()
    (tmp_path / "not-vqa" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit, match="is a bert model; supported"):
        dpg.VQAJudge(tmp_path / "not-vqa", "cpu", "fp32", 4)
