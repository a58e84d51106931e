r"""
GenEval (Ghosh et al. 2023) for L2P and its source: 553 prompts of six object-centric tasks, 4 images each, judged
by an instance detector and CLIP; overall = mean of the six task accuracies (paper: L2P 0.76, Z-Image-Turbo 0.82).

    python bench/geneval.py --metadata geneval/prompts/evaluation_metadata.jsonl --out runs/geneval-l2p \
        --ckpt l2p-1k.safetensors --text-encoder Z-Image-Turbo/ \
        --detector mask2former-swin-small-coco-instance/ --clip clip-vit-large-patch14/
    python bench/geneval.py ... --latent Z-Image-Turbo/          # the source LDM, the same way
    python bench/geneval.py ... --stage generate                 # images only (GPU); --stage score later

Images go to <out>/<index:05d>/samples/<k:04d>.png next to <out>/<index:05d>/metadata.jsonl, GenEval's own layout,
so its original harness can score them too. Judges are transformers models in local folders: Mask2Former
(COCO instance) for detection, CLIP ViT-L/14 for colours. The rules are GenEval's: a detection counts when its
score > 0.3 (> 0.9 for counting prompts), at most 16 per class, most confident first; colour = CLIP's zero-shot
pick among 10 colours on the object's masked crop; position by box centres with a 0.1 margin. Both stages resume:
images and per-prompt scores already on disk and valid are kept.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model.py and bench/ from the repo root
from bench import evalgen  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# 1. GenEval's rules (pure functions on detections: testable without any model)
# ----------------------------------------------------------------------------------------------------------------

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
THRESHOLD = 0.3  # detection score a detection must exceed to count
COUNTING_THRESHOLD = 0.9  # the same for counting prompts: stray low-confidence boxes would break exact counts
MAX_OBJECTS = 16  # per class, most confident first
POSITION_MARGIN = 0.1  # of the two boxes' summed extent, per axis, that centre offsets must exceed


def read_metadata(path: Path) -> list[dict]:
    """GenEval's evaluation_metadata.jsonl: one prompt per line, checked so a bad row fails here, not hours later."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--metadata {path} does not exist (GenEval's prompts/evaluation_metadata.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{where}: not JSON ({e})") from None
        if row.get("tag") not in TASKS or not isinstance(row.get("prompt"), str) or not row.get("include"):
            raise SystemExit(f"{where}: expected a 'tag' in {TASKS}, a 'prompt' and a non-empty 'include'")
        for j, req in enumerate(row["include"]):
            if not isinstance(req.get("class"), str) or not isinstance(req.get("count"), int) or req["count"] < 1:
                raise SystemExit(f"{where}: include[{j}] needs a 'class' and a positive 'count', got {req}")
            if "color" in req and req["color"] not in COLORS:
                raise SystemExit(f"{where}: include[{j}] colour {req['color']!r} is not one of {COLORS}")
            if "position" in req:
                relation, target = req["position"]
                if relation not in RELATIONS or not 0 <= target < j:
                    raise SystemExit(f"{where}: include[{j}] position {req['position']} must be [one of {RELATIONS}, "
                                     "the index of an earlier include]")
        for j, req in enumerate(row.get("exclude", [])):
            if not isinstance(req.get("class"), str) or not isinstance(req.get("count"), int):
                raise SystemExit(f"{where}: exclude[{j}] needs a 'class' and a 'count', got {req}")
        rows.append(row)
    if not rows:
        raise SystemExit(f"{path} holds no prompt")
    return rows


def kept_objects(detections: list[dict], tag: str) -> dict[str, list[dict]]:
    """class -> the detections that count, most confident first: score above the task's threshold, at most 16."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    objects = {}
    for det in sorted(detections, key=lambda d: d["score"], reverse=True):
        if det["score"] > threshold:
            group = objects.setdefault(det["class"], [])
            if len(group) < MAX_OBJECTS:
                group.append(det)
    return objects


def relative_position(box_a, box_b) -> set[str]:
    """Where box A (x1, y1, x2, y2; y down) lies relative to box B: a subset of RELATIONS.

    The centre offset loses, per axis, POSITION_MARGIN times the boxes' summed extent (so touching or overlapping
    boxes are not "left of" each other); a relation holds when its direction carries over half of the whole offset.
    """
    a, b = np.asarray(box_a[:4], dtype=float), np.asarray(box_b[:4], dtype=float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    extent = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - POSITION_MARGIN * extent, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in relations.items() if holds}


def evaluate_image(metadata: dict, detections: list[dict]) -> tuple[bool, str]:
    """GenEval's verdict on one image: (correct, reason), reason empty when correct.

    detections: [{"class", "score", "box": [x1, y1, x2, y2], "color"?}] of the whole image. Every include clause
    must hold (its `count` most confident objects exist; have the colour; lie in the relation to every object of the
    clause it points to, which must itself have held); no exclude clause may (count or more objects of its class).
    Colour is read from the objects the colour clause inspects, so those must carry "color".
    """
    objects = kept_objects(detections, metadata["tag"])
    reasons, groups = [], []
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        holds = len(found) >= count
        if not holds:
            reasons.append(f"expected {name} >= {count}, found {len(found)}")
        if holds and "color" in req:
            if any("color" not in obj for obj in found):
                raise ValueError(f"{name}: the colour rule needs the 'color' of its {count} most confident objects")
            colors = [obj["color"] for obj in found]
            if colors.count(req["color"]) < count:
                holds = False
                reasons.append(f"expected {req['color']} {name} >= {count}, found {', '.join(colors)}")
        if holds and "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                holds = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                pairs = [relative_position(obj["box"], t["box"]) for obj in found for t in groups[target]]
                misplaced = [relations for relations in pairs if relation not in relations]
                if misplaced:
                    holds = False
                    reasons.append(f"expected {name} {relation} target, found "
                                   f"{' and '.join(sorted(misplaced[0])) or 'no clear relation'}")
        groups.append(found if holds else None)
    for req in metadata.get("exclude", []):
        found = len(objects.get(req["class"], []))
        if found >= req["count"]:
            reasons.append(f"expected {req['class']} < {req['count']}, found {found}")
    return not reasons, "; ".join(reasons)


def summarize(image_results: list[dict]) -> dict:
    """Per-task accuracy over images, overall = mean of the task accuracies (GenEval's headline number)."""
    tasks = {}
    for tag in TASKS:
        verdicts = [r["correct"] for r in image_results if r["tag"] == tag]
        if verdicts:
            tasks[tag] = {"accuracy": sum(verdicts) / len(verdicts), "correct": sum(verdicts), "images": len(verdicts)}
    by_prompt = {}
    for r in image_results:
        by_prompt[r["index"]] = by_prompt.get(r["index"], False) or r["correct"]
    return {"overall": float(np.mean([t["accuracy"] for t in tasks.values()])) if tasks else None,
            "tasks": tasks,
            "images": len(image_results),
            "correct_images": sum(r["correct"] for r in image_results) / max(1, len(image_results)),
            "prompts_with_a_correct_image": sum(by_prompt.values()) / max(1, len(by_prompt))}


# ----------------------------------------------------------------------------------------------------------------
# 2. Judges: Mask2Former instance detection and CLIP colours, through transformers
# ----------------------------------------------------------------------------------------------------------------

# GenEval names three COCO classes differently from the COCO (and Hugging Face) label sets.
LABEL_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
COLOR_TEMPLATES = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}", "a photo of a {color} object")
BACKGROUND = "#999999"  # what replaces the pixels outside an object's mask before CLIP sees the crop


def geneval_name(label: str) -> str:
    name = re.sub(r"[_-]+", " ", label.strip().lower())
    return LABEL_ALIASES.get(name, name)


def mask2former_class():
    """Mask2FormerForUniversalSegmentation without its training loss, whose Hungarian matcher would need scipy:
    the same network, loading the same checkpoints. (Built on call: transformers is imported only when needed.)"""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerModel
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPreTrainedModel

    class Mask2FormerDetector(Mask2FormerForUniversalSegmentation):
        def __init__(self, config):
            Mask2FormerPreTrainedModel.__init__(self, config)
            self.model = Mask2FormerModel(config)
            self.class_predictor = torch.nn.Linear(config.hidden_dim, config.num_labels + 1)
            self.post_init()

    return Mask2FormerDetector


def load_detector(folder: Path, device, dtype):
    """(model, image processor, label id -> GenEval class name) from a Mask2Former checkpoint folder."""
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type != "mask2former":
        raise SystemExit(f"--detector {folder} is a {config.model_type} model; GenEval needs a Mask2Former COCO "
                         "instance checkpoint (e.g. facebook/mask2former-swin-small-coco-instance)")
    detector = mask2former_class().from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    names = {int(i): geneval_name(label) for i, label in config.id2label.items()}
    return detector, processor, names


@torch.no_grad()
def detect(detector, processor, names: dict[int, str], images: list[Image.Image], size: int,
           min_score: float) -> list[list[dict]]:
    """Instance detections per image: [{"class", "score", "box", "mask"}] with score > min_score.

    Mask2Former's instance inference as mmdetection runs it for GenEval: the 100 best (query, class) pairs by class
    probability; each query's mask logits upsampled to the batch input, cut to the image's own area, resized to the
    original size; mask = logit > 0; score = class probability x mean mask probability inside the mask; box = the
    mask's extent. A pair whose class probability alone is <= min_score cannot pass, so its mask is skipped.
    (The transformers image processor resizes sides to multiples of 32 where mmdetection pads them; at 1024^2 ->
    800^2 the two agree.)
    """
    device, dtype = detector.device, detector.dtype
    resize = {"shortest_edge": size, "longest_edge": max(size, 1333)}
    inputs = processor(images=images, return_tensors="pt", size=resize)
    pixel_values, pixel_mask = inputs["pixel_values"].to(device, dtype), inputs["pixel_mask"].to(device)
    outputs = detector(pixel_values=pixel_values, pixel_mask=pixel_mask)
    class_probs = outputs.class_queries_logits.float().softmax(-1)[..., :-1]  # [B, Q, C]; the last is "no object"
    num_queries, num_classes = class_probs.shape[1:]
    results = []
    for b, image in enumerate(images):
        scores, pairs = class_probs[b].flatten().topk(num_queries)
        keep = scores > min_score
        scores, queries, labels = scores[keep], pairs[keep] // num_classes, pairs[keep] % num_classes
        valid_h, valid_w = int(pixel_mask[b].any(1).sum()), int(pixel_mask[b].any(0).sum())
        logits = outputs.masks_queries_logits[b, queries].float()[None]
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        logits = F.interpolate(logits[..., :valid_h, :valid_w], size=(image.height, image.width), mode="bilinear",
                               align_corners=False)[0]
        masks = logits > 0
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        detections = []
        for score, label, mask in zip((scores * mask_scores).tolist(), labels.tolist(), masks):
            if score <= min_score:
                continue
            cols, rows = mask.any(0).nonzero()[:, 0], mask.any(1).nonzero()[:, 0]
            box = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
            detections.append({"class": names[label], "score": score, "box": box, "mask": mask.cpu().numpy()})
        results.append(detections)
    return results


def load_clip(folder: Path, device, dtype):
    from transformers import AutoConfig, AutoProcessor, CLIPModel

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type != "clip":
        raise SystemExit(f"--clip {folder} is a {config.model_type} model; pass a CLIP checkpoint folder "
                         "(openai/clip-vit-large-patch14, GenEval's ViT-L/14)")
    clip = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
    return clip, AutoProcessor.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def color_embeddings(clip, processor, name: str) -> torch.Tensor:
    """[10, D]: per colour, the normalised mean of its three prompts' normalised text embeddings."""
    texts = [t.format(color=color, name=name) for color in COLORS for t in COLOR_TEMPLATES]
    inputs = processor(text=texts, padding=True, return_tensors="pt").to(clip.device)
    text = F.normalize(clip.get_text_features(**inputs).pooler_output.float(), dim=-1)
    return F.normalize(text.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1), dim=-1)


def masked_crop(image: Image.Image, det: dict) -> Image.Image:
    """The object alone: pixels outside its mask turned grey, cropped to its box."""
    background = Image.new("RGB", image.size, BACKGROUND)
    mask = Image.fromarray(det["mask"].astype(np.uint8) * 255)  # 2-D uint8: an "L" image
    return Image.composite(image, background, mask).crop(det["box"])


@torch.no_grad()
def classify_colors(clip, processor, image: Image.Image, dets: list[dict], embeddings: torch.Tensor) -> list[str]:
    inputs = processor(images=[masked_crop(image, d) for d in dets], return_tensors="pt").to(clip.device, clip.dtype)
    features = F.normalize(clip.get_image_features(**inputs).pooler_output.float(), dim=-1)
    return [COLORS[i] for i in (features @ embeddings.T).argmax(1).tolist()]


class Judges:
    """The detector and CLIP, loaded on first use (a resumed run with nothing left to score loads neither)."""

    def __init__(self, args):
        self.args, self.models, self.color_cache = args, None, {}
        self.description = {"detector": str(Path(args.detector).resolve()), "detector_size": args.detector_size,
                            "clip": str(Path(args.clip).resolve()), "dtype": args.judge_dtype,
                            "threshold": THRESHOLD, "counting_threshold": COUNTING_THRESHOLD,
                            "max_objects": MAX_OBJECTS, "position_margin": POSITION_MARGIN}

    def load(self, rows):
        if self.models is not None:
            return
        dtype = evalgen.DTYPES[self.args.judge_dtype]
        detector, processor, names = load_detector(Path(self.args.detector), self.args.device, dtype)
        needed = {req["class"] for row in rows for req in row["include"] + row.get("exclude", [])}
        unknown = sorted(needed - set(names.values()))
        if unknown:
            raise SystemExit(f"--detector {self.args.detector} does not detect {unknown[:5]} (its labels: "
                             f"{sorted(names.values())[:5]}...); GenEval needs a COCO instance detector")
        self.models = (detector, processor, names), load_clip(Path(self.args.clip), self.args.device, dtype)

    def judge(self, row: dict, images: list[Image.Image]) -> list[dict]:
        """Detections (with colours where the rules look at them) and the verdict, per image."""
        (detector, processor, names), (clip, clip_processor) = self.models
        min_score = min(THRESHOLD, COUNTING_THRESHOLD)
        results = []
        for image, dets in zip(images, detect(detector, processor, names, images, self.args.detector_size, min_score)):
            objects = kept_objects(dets, row["tag"])
            for req in row["include"]:
                inspected = objects.get(req["class"], [])[:req["count"]]
                if "color" in req and inspected:
                    if req["class"] not in self.color_cache:
                        self.color_cache[req["class"]] = color_embeddings(clip, clip_processor, req["class"])
                    colors = classify_colors(clip, clip_processor, image, inspected, self.color_cache[req["class"]])
                    for det, color in zip(inspected, colors):
                        det["color"] = color
            correct, reason = evaluate_image(row, dets)
            kept = [{k: v for k, v in d.items() if k != "mask"} for d in dets]
            results.append({"correct": correct, "reason": reason, "detections": kept})
        return results


# ----------------------------------------------------------------------------------------------------------------
# 3. Stages
# ----------------------------------------------------------------------------------------------------------------

def sample_path(out: Path, index: int, k: int) -> Path:
    return out / f"{index:05d}" / "samples" / f"{k:04d}.png"


def generate_stage(args, rows: list[dict]):
    settings = evalgen.sampler_settings(args, args.images_per_prompt)
    out, n = Path(args.out), args.images_per_prompt
    evalgen.check_settings(out, settings)
    size = (settings["width"], settings["height"])
    jobs = []
    for i, row in enumerate(rows):
        metadata_file = out / f"{i:05d}" / "metadata.jsonl"
        if not metadata_file.exists():
            evalgen.write_text(metadata_file, json.dumps(row) + "\n")
        elif json.loads(metadata_file.read_text()) != row:
            raise SystemExit(f"{metadata_file.parent} holds images of another prompt than line {i + 1} of --metadata; "
                             "use another --out or delete that folder")
        jobs += [evalgen.Job((i, k), row["prompt"], args.seed + i * n + k) for k in range(n)
                 if not evalgen.valid_image(sample_path(out, i, k), size)]
    print(f"GenEval: {len(rows)} prompts x {n} images, {len(rows) * n - len(jobs)} already on disk, "
          f"{len(jobs)} to make")
    evalgen.generate_images(settings, jobs, lambda job, image: evalgen.save_png(sample_path(out, *job.key), image),
                            args.batch_size, args.device)


def prompt_samples(out: Path, index: int, row: dict) -> list[Path]:
    """The images of prompt `index` (every samples/NNNN.png, as GenEval's harness takes them)."""
    folder = out / f"{index:05d}"
    if not (folder / "metadata.jsonl").exists():
        raise SystemExit(f"{folder}/metadata.jsonl is missing: run --stage generate first")
    if json.loads((folder / "metadata.jsonl").read_text()) != row:
        raise SystemExit(f"{folder} was made for another prompt than line {index + 1} of --metadata")
    samples = sorted(p for p in (folder / "samples").glob("*.png") if re.fullmatch(r"\d+\.png", p.name))
    if not samples or not all(evalgen.valid_image(p) for p in samples):
        raise SystemExit(f"{folder}/samples lacks images or holds a broken one: run --stage generate first")
    return samples


def score_stage(args, rows: list[dict]) -> tuple[list[dict], dict]:
    """Judge every prompt's images (reusing per-prompt scores whose judge, prompt and image bytes are unchanged).
    Returns the per-image verdicts and the judges' description."""
    out, judges = Path(args.out), Judges(args)
    image_results = []
    for i, row in enumerate(tqdm(rows, desc="scoring", unit="prompt")):
        samples = prompt_samples(out, i, row)
        files = [{"file": str(p.relative_to(out)), "sha256": evalgen.file_sha256(p)} for p in samples]
        score_file = out / "scores" / f"{i:05d}.json"
        saved = evalgen.read_json(score_file) or {}
        if not (saved.get("judge") == judges.description and saved.get("metadata") == row
                and [{"file": r.get("file"), "sha256": r.get("sha256")} for r in saved.get("images", [])] == files):
            judges.load(rows)
            verdicts = judges.judge(row, [Image.open(p).convert("RGB") for p in samples])
            saved = {"judge": judges.description, "metadata": row,
                     "images": [{**f, **v} for f, v in zip(files, verdicts)]}
            evalgen.write_json(score_file, saved)
        image_results += [{"index": i, "tag": row["tag"], "correct": r["correct"]} for r in saved["images"]]
    return image_results, judges.description


def write_results(args, rows: list[dict], total: int, image_results: list[dict], judge: dict):
    out = Path(args.out)
    summary = summarize(image_results)
    generation = evalgen.describe_generation(out)
    results = {"benchmark": "GenEval", "metadata": str(Path(args.metadata).resolve()), "prompts": len(rows),
               "prompts_in_metadata": total, "partial": len(rows) < total, "generation": generation,
               "judges": judge, **summary}
    evalgen.write_json(out / "results.json", results)
    lines = [f"# GenEval: {Path(generation.get('checkpoint', str(out))).name}", "",
             "| task | accuracy | correct / images |", "|---|---|---|"]
    lines += [f"| {tag} | {t['accuracy']:.4f} | {t['correct']} / {t['images']} |"
              for tag, t in summary["tasks"].items()]
    lines += [f"| **overall** (mean of {len(summary['tasks'])} tasks) | **{summary['overall']:.4f}** | |", ""]
    if results["partial"]:
        lines += [f"**Partial run: {len(rows)} of {total} prompts; not comparable with full-benchmark numbers.**", ""]
    lines += evalgen.generation_lines(generation)
    lines += [f"- prompts: {len(rows)} from `{results['metadata']}`, {summary['images']} images",
              f"- detector: `{judge['detector']}` (Mask2Former via transformers, images resized to shortest side "
              f"{judge['detector_size']})",
              f"- colours: `{judge['clip']}` (CLIP zero-shot over {len(COLORS)} colours on masked crops)",
              f"- rules: score > {THRESHOLD} (> {COUNTING_THRESHOLD} for counting), at most {MAX_OBJECTS} per class, "
              f"position margin {POSITION_MARGIN}; judges in {judge['dtype']}",
              "- judges other than GenEval's mmdetection Mask2Former Swin-S and open_clip ViT-L/14 make numbers "
              "comparable among our runs, not exactly with published tables"]
    evalgen.write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metadata", required=True, help="GenEval's prompts/evaluation_metadata.jsonl")
    evalgen.add_common_args(parser)
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4, GenEval's)")
    evalgen.add_generation_args(parser)
    judges = parser.add_argument_group("judges (used by --stage score and all)")
    judges.add_argument("--detector", help="local folder of a Mask2Former COCO instance model for transformers "
                                           "(e.g. facebook/mask2former-swin-small-coco-instance)")
    judges.add_argument("--clip", help="local folder of a CLIP model for transformers "
                                       "(openai/clip-vit-large-patch14 = GenEval's ViT-L/14)")
    judges.add_argument("--detector-size", type=int, default=800,
                        help="shortest image side the detector sees (default 800, longest <= 1333: mmdetection's "
                             "test scale, which GenEval used)")
    args = parser.parse_args(argv)
    if args.stage != "generate" and not (args.detector and args.clip):
        parser.error("--stage score/all needs --detector and --clip")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = read_metadata(args.metadata)
    total, rows = len(rows), rows[:args.limit]
    if args.stage in ("generate", "all"):
        generate_stage(args, rows)
    if args.stage in ("score", "all"):
        write_results(args, rows, total, *score_stage(args, rows))


if __name__ == "__main__":
    main()
