r"""
DPG-Bench (Hu et al. 2024, ELLA) for L2P and its source: 1,065 dense prompts, 4 images each composed into a 2x2 grid,
judged by a VQA model answering the benchmark's yes/no questions (paper: L2P 86.00, Z-Image-Turbo 84.86).

    python bench/dpg.py --prompts ELLA/dpg_bench/prompts --questions ELLA/dpg_bench/dpg_bench.csv \
        --out runs/dpg-l2p --ckpt l2p-1k.safetensors --text-encoder Z-Image-Turbo/ --vqa blip-vqa-capfilt-large/
    python bench/dpg.py ... --latent Z-Image-Turbo/              # the source LDM, the same way
    python bench/dpg.py ... --stage score --vqa Qwen2.5-VL-7B-Instruct/ --out runs/dpg-l2p   # another judge

Grids go to <out>/images/<item_id>.png (4 images of --resolution side, k = 0..3 left to right, top to bottom), the
layout DPG-Bench's own compute_dpg_bench.py reads (--image-root-path <out>/images --pic-num 4). The judge is any
transformers model in a local folder: a VQA model (BLIP or ViLT; the paper's mPLUG-large is not in transformers) or
an image-text-to-text chat model with a chat template, asked "<question> Answer yes or no.". The rules are
DPG-Bench's: each image is asked every question of its prompt; an answer counts only if it is "yes"; a question
whose parent (dependency ids, 0 = none) scored 0 scores 0; image score = mean over the questions; prompt score =
mean over its 4 images; DPG score = mean over prompts x 100. Category scores are, as in DPG-Bench's script, the
share of "yes" answers to the questions of each category_broad, before the dependency rule. Both stages resume.
"""

import argparse
import csv
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model.py and bench/ from the repo root
from bench import evalgen  # noqa: E402
import model  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# 1. DPG-Bench's rules (pure functions on answers: testable without any model)
# ----------------------------------------------------------------------------------------------------------------

QUESTION_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                    "category_detailed", "tuple", "question_natural_language")
CATEGORIES = ("global", "entity", "attribute", "relation", "other")
IMAGES_PER_PROMPT = 4  # the 2x2 grid


@dataclass
class Question:
    id: int
    question: str
    parents: list[int]  # proposition ids this question depends on; 0 = none
    category: str  # category_broad
    detailed: str  # category_detailed


def read_questions(path: Path) -> dict[str, list[Question]]:
    """dpg_bench.csv -> item_id -> its questions, in file order (every row counts; items need not be contiguous)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--questions {path} does not exist (DPG-Bench's dpg_bench.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in QUESTION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path} lacks the columns {missing} (found {reader.fieldnames}); expected DPG-Bench's "
                             f"dpg_bench.csv with {', '.join(QUESTION_COLUMNS)}")
        items = {}
        for line, row in enumerate(reader, 2):
            item = row["item_id"].strip()
            if not re.fullmatch(r"[\w.-]+", item):
                raise SystemExit(f"{path}:{line}: item_id {item!r} cannot name an image file")
            try:
                question = Question(int(row["proposition_id"]), row["question_natural_language"].strip(),
                                    [int(p) for p in row["dependency"].split(",")], row["category_broad"].strip(),
                                    row["category_detailed"].strip())
            except ValueError:
                raise SystemExit(f"{path}:{line}: proposition_id {row['proposition_id']!r} and dependency "
                                 f"{row['dependency']!r} must be integers ('1' or '1,2'; 0 = no parent)") from None
            if any(q.id == question.id for q in items.get(item, [])):
                raise SystemExit(f"{path}:{line}: item {item} has proposition {question.id} twice")
            items.setdefault(item, []).append(question)
    for item, questions in items.items():
        ids = {q.id for q in questions}
        for q in questions:
            if any(p != 0 and p not in ids for p in q.parents):
                raise SystemExit(f"{path}: item {item} question {q.id} depends on {q.parents}, not all among {ids}")
    if not items:
        raise SystemExit(f"{path} holds no question")
    return items


def read_prompts(folder: Path, items) -> dict[str, str]:
    """item_id -> the prompt in <folder>/<item_id>.txt, for every item of the question file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"--prompts {folder} is not a folder (DPG-Bench's prompts/ of <item_id>.txt files)")
    missing = [item for item in items if not (folder / f"{item}.txt").is_file()]
    if missing:
        raise SystemExit(f"{folder} lacks the prompts of {len(missing)} items of the question file "
                         f"(first: {missing[:5]})")
    return {item: (folder / f"{item}.txt").read_text(encoding="utf-8").strip() for item in items}


def is_yes(answer: str) -> bool:
    """An answer counts only if it is "yes": its first word, ignoring case and punctuation (chat models say "Yes.")."""
    return re.match(r"\s*yes\b", answer, re.IGNORECASE) is not None


def question_scores(questions: list[Question], answers: list[str]) -> list[float]:
    """1 per "yes", 0 otherwise; then, in question order, a question whose parent scores 0 scores 0 (so a zeroed
    parent zeroes its own children in turn, as DPG-Bench's script does it)."""
    scores = {q.id: float(is_yes(a)) for q, a in zip(questions, answers, strict=True)}
    for q in questions:
        if any(p != 0 and scores[p] == 0 for p in q.parents):
            scores[q.id] = 0.0
    return [scores[q.id] for q in questions]


def score_prompt(questions: list[Question], tile_answers: list[list[str]]) -> dict:
    """One prompt's grid: per image, the mean of its question scores; the prompt's score, the mean over images."""
    tile_scores = [float(np.mean(question_scores(questions, answers))) for answers in tile_answers]
    return {"tile_scores": tile_scores, "score": float(np.mean(tile_scores))}


def summarize(prompt_results: list[dict]) -> dict:
    """prompt_results: [{"score", "questions": [Question as dict], "answers": [[str] per image]}].
    DPG score = mean prompt score x 100; per category (broad and broad - detailed) = share of "yes" x 100."""
    broad, detailed = {}, {}
    for result in prompt_results:
        for answers in result["answers"]:
            for q, answer in zip(result["questions"], answers):
                broad.setdefault(q["category"], []).append(is_yes(answer))
                detailed.setdefault(f"{q['category']} - {q['detailed']}", []).append(is_yes(answer))
    order = lambda name: (CATEGORIES.index(name) if name in CATEGORIES else len(CATEGORIES), name)
    mean100 = lambda values: 100 * float(np.mean(values))
    return {"score": mean100([r["score"] for r in prompt_results]),
            "categories": {c: mean100(broad[c]) for c in sorted(broad, key=order)},
            "categories_detailed": {c: mean100(detailed[c]) for c in sorted(detailed)},
            "prompts": len(prompt_results),
            "questions": sum(len(r["questions"]) for r in prompt_results)}


# ----------------------------------------------------------------------------------------------------------------
# 2. The VQA judge, through transformers
# ----------------------------------------------------------------------------------------------------------------

VQA_MODEL_TYPES = ("blip", "vilt")  # VQA heads that take the bare question (BLIP generates, ViLT classifies)
CHAT_SUFFIX = " Answer yes or no."
MAX_ANSWER_TOKENS = 8


class VQAJudge:
    """answer(images, questions) -> one answer string per (image, question) pair, from a local model folder.
    The model loads on first use: a resumed run with nothing left to score reads only its config."""

    def __init__(self, folder: Path, device, dtype: str, batch_size: int):
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        self.folder, self.device, self.dtype, self.batch_size = Path(folder), device, dtype, batch_size
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type in VQA_MODEL_TYPES:
            self.chat = False
        elif config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            self.chat = True
        else:
            raise SystemExit(f"--vqa {folder} is a {config.model_type} model; supported: {VQA_MODEL_TYPES} VQA "
                             "models, or image-text-to-text chat models (e.g. Qwen2.5-VL, LLaVA)")
        self.model = self.processor = None
        self.description = {"vqa": str(self.folder.resolve()), "model_type": config.model_type,
                            "architectures": config.architectures, "dtype": dtype,
                            "question": "{question}" + (CHAT_SUFFIX + " (in its chat template)" if self.chat else "")}

    def load(self):
        from transformers import AutoModelForImageTextToText, AutoModelForVisualQuestionAnswering, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        if self.chat and not getattr(self.processor, "chat_template", None):
            raise SystemExit(f"--vqa {self.folder} has no chat template to ask questions with; pass an "
                             "instruction-tuned (chat) checkpoint")
        if self.chat:
            self.processor.tokenizer.padding_side = "left"  # generation continues every prompt from its end
        auto = AutoModelForImageTextToText if self.chat else AutoModelForVisualQuestionAnswering
        self.model = auto.from_pretrained(self.folder, local_files_only=True, dtype=evalgen.DTYPES[self.dtype])
        self.model = self.model.to(self.device).eval()

    @torch.no_grad()
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        if self.model is None:
            self.load()
        answers = []
        for start in range(0, len(questions), self.batch_size):
            answers += self.answer_batch(images[start:start + self.batch_size],
                                         questions[start:start + self.batch_size])
        return answers

    def answer_batch(self, images, questions) -> list[str]:
        if self.chat:
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q + CHAT_SUFFIX}]}],
                add_generation_prompt=True, tokenize=False) for q in questions]
            inputs = self.processor(text=texts, images=[[image] for image in images], padding=True,
                                    return_tensors="pt")
        else:
            inputs = self.processor(images=images, text=questions, padding=True, truncation=True, return_tensors="pt")
        inputs = {k: v.to(self.model.device, self.model.dtype) if v.is_floating_point() else v.to(self.model.device)
                  for k, v in inputs.items()}
        if not self.model.can_generate():  # ViLT: a classifier over its answer vocabulary
            return [self.model.config.id2label[i] for i in self.model(**inputs).logits.argmax(-1).tolist()]
        ids = self.model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
        if self.chat:
            ids = ids[:, inputs["input_ids"].shape[1]:]  # a decoder-only model returns the prompt first
        return [a.strip() for a in self.processor.batch_decode(ids, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------------------------
# 3. Stages
# ----------------------------------------------------------------------------------------------------------------

def grid_path(out: Path, item: str) -> Path:
    return out / "images" / f"{item}.png"


def make_grid(images: list[Image.Image]) -> Image.Image:
    """4 images -> 2x2 grid, image k at row k // 2, column k % 2 (DPG-Bench's tile order)."""
    return Image.fromarray(model.image_grid([np.asarray(image.convert("RGB")) for image in images], columns=2))


def grid_tiles(grid: Image.Image) -> list[Image.Image]:
    w, h = grid.width // 2, grid.height // 2
    return [grid.crop(((k % 2) * w, (k // 2) * h, (k % 2 + 1) * w, (k // 2 + 1) * h)) for k in range(4)]


def generate_stage(args, items: list[str], prompts: dict[str, str]):
    settings = evalgen.sampler_settings(args, IMAGES_PER_PROMPT)
    out, n = Path(args.out), IMAGES_PER_PROMPT
    evalgen.check_settings(out, settings)
    grid_size = (2 * settings["width"], 2 * settings["height"])
    todo = [(i, item) for i, item in enumerate(items) if not evalgen.valid_image(grid_path(out, item), grid_size)]
    print(f"DPG-Bench: {len(items)} prompts x {n} images, {len(items) - len(todo)} grids already on disk, "
          f"{len(todo)} to make")
    jobs = [evalgen.Job((item, k), prompts[item], args.seed + i * n + k) for i, item in todo for k in range(n)]
    pending = {}

    def on_image(job, image):  # a grid is written once all its images exist
        item, k = job.key
        pending.setdefault(item, {})[k] = image
        if len(pending[item]) == n:
            images = pending.pop(item)
            evalgen.save_png(grid_path(out, item), make_grid([images[k] for k in range(n)]))

    evalgen.generate_images(settings, jobs, on_image, args.batch_size, args.device)


def score_stage(args, items: list[str], questions: dict[str, list[Question]], prompts: dict[str, str]):
    """Ask every question about every image of every grid (reusing per-prompt scores whose judge, questions and
    grid bytes are unchanged). Returns the per-prompt results and the judge's description."""
    out, results = Path(args.out), []
    judge = VQAJudge(Path(args.vqa), args.device, args.judge_dtype, args.vqa_batch_size)
    for item in tqdm(items, desc="scoring", unit="prompt"):
        path = grid_path(out, item)
        if not evalgen.valid_image(path):
            raise SystemExit(f"{path} is missing or broken: run --stage generate first")
        grid = {"file": str(path.relative_to(out)), "sha256": evalgen.file_sha256(path)}
        asked = [asdict(q) for q in questions[item]]
        score_file = out / "scores" / f"{item}.json"
        saved = evalgen.read_json(score_file) or {}
        if not (saved.get("judge") == judge.description and saved.get("grid") == grid
                and saved.get("questions") == asked):
            texts = [q.question for q in questions[item]]
            answers = judge.answer([tile for tile in grid_tiles(Image.open(path).convert("RGB")) for _ in texts],
                                   texts * IMAGES_PER_PROMPT)
            tile_answers = [answers[k * len(texts):(k + 1) * len(texts)] for k in range(IMAGES_PER_PROMPT)]
            saved = {"judge": judge.description, "item_id": item, "prompt": prompts[item], "grid": grid,
                     "questions": asked, "answers": tile_answers, **score_prompt(questions[item], tile_answers)}
            evalgen.write_json(score_file, saved)
        results.append(saved)
    return results, judge.description


def write_results(args, items: list[str], total: int, prompt_results: list[dict], judge: dict):
    out = Path(args.out)
    summary = summarize(prompt_results)
    generation = evalgen.describe_generation(out)
    results = {"benchmark": "DPG-Bench", "questions_file": str(Path(args.questions).resolve()),
               "prompts_folder": str(Path(args.prompts).resolve()), "prompts_in_benchmark": total,
               "partial": len(items) < total, "generation": generation, "judge": judge, **summary}
    evalgen.write_json(out / "results.json", results)
    lines = [f"# DPG-Bench: {Path(generation.get('checkpoint', str(out))).name}", "",
             "| | score |", "|---|---|", f"| **DPG score** (mean over prompts x 100) | **{summary['score']:.2f}** |"]
    lines += [f"| {category} | {value:.2f} |" for category, value in summary["categories"].items()]
    lines += ["", "Category rows: share of \"yes\" answers to that category's questions (x 100), before the dependency "
              "rule, as DPG-Bench's script reports them.", ""]
    if results["partial"]:
        lines += [f"**Partial run: {len(items)} of {total} prompts; not comparable with full-benchmark numbers.**", ""]
    lines += evalgen.generation_lines(generation)
    lines += [f"- prompts: {summary['prompts']}, {summary['questions']} questions, each asked of all "
              f"{IMAGES_PER_PROMPT} images of a prompt",
              f"- VQA judge: `{judge['vqa']}` ({judge['model_type']}, {judge['dtype']}), asked "
              f"\"{judge['question']}\"; an answer counts when its first word is \"yes\"",
              "- a judge other than DPG-Bench's mPLUG-large makes scores comparable among our runs, not exactly with "
              "published tables"]
    evalgen.write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="DPG-Bench's prompts/ folder (<item_id>.txt files)")
    parser.add_argument("--questions", required=True, help="DPG-Bench's dpg_bench.csv (the questions per item)")
    evalgen.add_common_args(parser)
    evalgen.add_generation_args(parser)
    judge = parser.add_argument_group("judge (used by --stage score and all)")
    judge.add_argument("--vqa", help="local folder of the VQA judge for transformers: BLIP or ViLT VQA "
                                     "(e.g. Salesforce/blip-vqa-capfilt-large) or an image-text-to-text chat model "
                                     "(e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
    judge.add_argument("--vqa-batch-size", type=int, default=16, help="(image, question) pairs per judge call (default 16)")
    args = parser.parse_args(argv)
    if args.stage != "generate" and not args.vqa:
        parser.error("--stage score/all needs --vqa")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    questions = read_questions(args.questions)
    prompts = read_prompts(args.prompts, questions)
    items = list(questions)
    total, items = len(items), items[:args.limit]
    if args.stage in ("generate", "all"):
        generate_stage(args, items, prompts)
    if args.stage in ("score", "all"):
        write_results(args, items, total, *score_stage(args, items, questions, prompts))


if __name__ == "__main__":
    main()
