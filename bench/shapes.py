"""
The whole L2P recipe in miniature, on the CPU: a toy latent text-to-image model of captioned shape scenes, shipped in
Z-Image's published layout (bench/toy-source/, trained once by --train-source, as the real recipe starts from a
downloaded Z-Image), or with --family flux2 in FLUX.2 [klein]'s (bench/toy-source-flux2/); then the real scripts run
on it, exactly as on the 6B model:

    synth.py   the source LDM makes the training corpus (images + cached text features)
    convert.py the latent DiT becomes the pixel model (16x16 RGB patches + Detailer Head)
    train.py   only the shallow layers train (middle blocks frozen), on the synthetic corpus
    sample.py  pixel-space samples, side by side with the source

and ShapeEval (bench/shapeworld.py, a rule-based GenEval) scores ground truth, VAE reconstructions, the source, L2P
and a baseline: the same pixel architecture trained from scratch, every layer trainable, same data and steps.

    python bench/shapes.py            # quick: <= 10 min on 2 cores, the qualitative result
    python bench/shapes.py --full     # sized to measure the claim, <= 60 min on 2 cores
    python bench/shapes.py --full --real-data   # + L2P on ground-truth renders of the same prompts (the paper's
                                                #   data ablation: the source's own samples should win)

Finished stages are cached under --runs with their wall time and code commit (--fresh redoes them). Output: results.md
+ results.json (per-task and overall ShapeEval, trainable fraction, seconds and commit per stage, the curve from step 0:
ShapeEval, the validation losses on held-out source samples and the prompt effect, for L2P and scratch; the ablation
of every L2P recipe run in the folder), curve.png, grid.png (source | L2P | scratch for the same prompts and seeds)
and grid_step0.png (source | the converted L2P model before training); a run of another recipe or --name writes them
with its name (results-paper.md, ...), so the default run's files stay its own. The last line printed is the JSON's
path.
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import convert  # noqa: E402
import model  # noqa: E402
import shapeworld  # noqa: E402
import toysource  # noqa: E402
import train  # noqa: E402

SIZE = toysource.SIZE
HEAD_WIDTH = 16  # the toy Detailer Head: the released layout with a quarter of the channels
DEFAULT_RECIPE = "lift"  # the recipe whose results keep the plain names (results.md, grid.png, ...)


@dataclass
class Plan:
    """Every size and step count of one run (quick or full)."""
    corpus_prompts: int  # prompts x seeds images that synth.py makes for L2P (the paper: 10k x 2)
    corpus_seeds: int
    pixel_steps: int  # train.py steps for L2P and for the scratch baseline
    pixel_batch: int
    pixel_lr: float
    head_lr_fan_in: int  # train.py --head-lr-fan-in: wide head convs learn at pixel_lr x N / fan-in
    curve_every: int
    eval_prompts: int  # distinct prompts scored per model, an equal share per task (fewer where a task has fewer)
    eval_seeds: int  # images per prompt, seeds 0, 1, ... (GenEval: 4)
    sample_steps: int
    source_cfg: float  # the toy source's CFG c, v_neg + c (v_pos - v_neg), as pixel_cfg
    pixel_cfg: float
    train_blocks: int
    lift_lr: float  # --recipe lift: train.py's defaults for a lifted init (the head alone, x0 loss) at this lr
    head_steps: int  # --recipe lift: convert.py --head-steps (the head learns to decode the lifted latents)


# Paper-style recipes: pixel lr 1e-3 with the head's wide convolutions slowed by their fan-in (--head-lr-fan-in 288):
# with one lr for everything the deepest decoder conv dies and the output stops depending on the prompt. The lifted
# model trains its head alone, taught to decode by convert.py --head-steps first, at one lower lr (bench/RESULTS.md).
QUICK = Plan(corpus_prompts=256, corpus_seeds=2, pixel_steps=600, pixel_batch=16, pixel_lr=1e-3, head_lr_fan_in=288,
             curve_every=200, eval_prompts=24, eval_seeds=2, sample_steps=10, source_cfg=3.0, pixel_cfg=2.0,
             train_blocks=1, lift_lr=3e-4, head_steps=1000)
FULL = Plan(corpus_prompts=1000, corpus_seeds=2, pixel_steps=4000, pixel_batch=16, pixel_lr=1e-3, head_lr_fan_in=288,
            curve_every=1000, eval_prompts=72, eval_seeds=4, sample_steps=30, source_cfg=3.0, pixel_cfg=2.0,
            train_blocks=1, lift_lr=3e-4, head_steps=2000)


def log(msg: str):
    print(f"[shapes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# Driving the real scripts
# ----------------------------------------------------------------------------------------------------------------


def script(name: str, *args, log_file: Path | None = None):
    """Run one of the project's scripts as a user would; its output goes to log_file (and the run fails loudly)."""
    cmd = [sys.executable, str(ROOT / name), *map(str, args)]
    with open(log_file or os.devnull, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if result.returncode:
        raise SystemExit(f"{name} failed (exit {result.returncode}); see {log_file}")


def sample_with_script(folder: Path, prompts_file: Path, plan: Plan, log_file: Path, device: str, *, ckpt=None,
                       latent=None, text_encoder=None):
    """sample.py on the evaluation prompts, seeds 0 .. eval_seeds - 1 each: <folder>/<prompt index>_s<seed>.png
    (_latent.png for the source)."""
    shutil.rmtree(folder, ignore_errors=True)
    flags = ["--prompts", prompts_file, "--res", SIZE, "--out", folder, "--device", device, "--dtype", "fp32",
             "--batch-size", 32, "--seed", 0, "--num-images", plan.eval_seeds]
    if ckpt is not None:
        flags += ["--ckpt", ckpt, "--text-encoder", text_encoder, "--steps", plan.sample_steps, "--cfg", plan.pixel_cfg]
    else:
        flags += ["--latent", latent, "--latent-steps", plan.sample_steps, "--latent-cfg", plan.source_cfg]
    script("sample.py", *flags, log_file=log_file)


def random_pixel_init(path: Path, seed: int, source_cfg: "model.ZImageConfig | model.Flux2Config"):
    """The scratch baseline's start: the same pixel architecture, every weight freshly initialised."""
    torch.manual_seed(seed)
    net = model.new_model(model.l2p_config(source_cfg, 16, HEAD_WIDTH))
    model.write_safetensors(path, {k: v.detach().contiguous() for k, v in net.state_dict().items()},
                            {"format": "l2p", "l2p_patch": "16", "source": "random init (scratch baseline)"})


VAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
PROMPT_EFFECT_SIGMA = 0.9  # where the layout is decided, so where the source's own v depends most on the prompt


@torch.no_grad()
def validation_metrics(ckpt: Path, images: torch.Tensor, cap: torch.Tensor, cap_mask: torch.Tensor,
                       empty: torch.Tensor, vae, source_states: bool) -> tuple[float, float, float, float]:
    """(validation loss, prompt effect, x0 validation loss, training-state x0 loss) on held-out images (the source's
    samples for the evaluation prompts).

    The loss is the flow-matching loss at fixed sigmas and noise: a continuous measure of convergence that moves
    before ShapeEval, which needs well-formed objects; the x0 loss is the same error on x0 = x_sigma - sigma v
    (sigma^2 times it), the objective of train.py --loss x0. It can fall while the model ignores the prompt (the noisy
    image alone says much about v), so the prompt effect, |v(prompt) - v(empty prompt)| / |v(prompt)| at
    sigma = PROMPT_EFFECT_SIGMA, shows whether the caption reaches the output at all (0 = deaf).

    Those noise the images themselves, a state a lifted model's sampler never holds: the training-state x0 loss is the
    same x0 error against the same images from the states and forward pass train.py trains the model on (the whole
    decode; source_states, train.py --states source: the image's in-span part replaced by the lift of its `vae`
    latent, else the images noised), i.e. the held-out value of its training objective in one unit for every model."""
    net = model.load_model(ckpt, dtype=torch.float32).eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    losses = [(net((1 - s) * images + s * noise, torch.full((len(images),), s), cap, cap_mask) - (noise - images))
              .square().mean() for s in VAL_SIGMAS]
    x0_loss = float(sum(s * s * loss for s, loss in zip(VAL_SIGMAS, losses)) / len(VAL_SIGMAS))
    s = torch.full((len(images),), PROMPT_EFFECT_SIGMA)
    x = (1 - PROMPT_EFFECT_SIGMA) * images + PROMPT_EFFECT_SIGMA * noise
    v = net(x, s, cap, cap_mask)
    v_empty = net(x, s, empty.expand(len(images), -1, -1), torch.ones(len(images), empty.shape[1], dtype=torch.bool))
    start = net.lift.source_image(images, vae, net.cfg.patch_size) if source_states else images
    train_x0 = [(x - s * net(x, torch.full((len(images),), s), cap, cap_mask, span_detail=True) - images).square()
                .mean() for s, x in ((s, (1 - s) * start + s * noise) for s in VAL_SIGMAS)]
    return (float(torch.stack(losses).mean()), float((v - v_empty).norm() / v.norm().clamp_min(1e-12)), x0_loss,
            float(torch.stack(train_x0).mean()))


def recipe_flags(plan: Plan, recipe: str) -> list:
    """train.py's flags for a recipe (the rest follows the init: train.py's defaults)."""
    if recipe == "lift":
        return ["--lr", plan.lift_lr]
    return ["--lr", plan.pixel_lr, "--head-lr-fan-in", plan.head_lr_fan_in]


def train_with_curve(name: str, init: Path, corpus: Path, run: Path, plan: Plan, train_blocks: int, flags: list,
                     score_fn, log_file: Path, device: str, curve_file: Path) -> list[dict]:
    """The init scored (step 0), then train.py in segments of curve_every steps (a resumed run equals an
    uninterrupted one), scored after each: score_fn(checkpoint, tag) -> (ShapeEval dict, validation loss, prompt
    effect, x0 validation loss, training-state x0 loss). Every point is written to curve_file as it is scored, and the
    curve continues from the points found there (a killed run, or a longer --steps)."""
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
    if not curve:
        shutil.rmtree(run, ignore_errors=True)
    for step in range(len(curve) * plan.curve_every, plan.pixel_steps + 1, plan.curve_every):
        if step:
            script("train.py", "--init", init, "--data", corpus, "--out", run, "--max-steps", step,
                   "--batch-size", plan.pixel_batch, *flags, "--warmup", 20, "--train-blocks", train_blocks,
                   "--res", SIZE, "--dtype", "fp32", "--device", device, "--workers", 0, "--no-grad-checkpointing",
                   "--save-every", plan.curve_every,
                   "--sample-every", plan.pixel_steps, "--sample-steps", plan.sample_steps, "--sample-guidance",
                   plan.pixel_cfg, "--log-every", 25, *(["--resume"] if step > plan.curve_every else []),
                   log_file=log_file)
        score, val, effect, val_x0, train_x0 = score_fn(run / "trained.safetensors" if step else init,
                                                        f"{name}_step{step}")
        curve.append({"step": step, "overall": score["overall"], "val_loss": val, "val_x0_loss": val_x0,
                      "train_state_x0_loss": train_x0, "prompt_effect": effect, "score": score})
        write_json(curve_file, curve)
        log(f"{name} step {step}: ShapeEval {score['overall']:.3f}, validation loss {val:.4f} (x0 {val_x0:.4f}, "
            f"training states {train_x0:.4f}), prompt effect {effect:.3f}")
    return curve[:plan.pixel_steps // plan.curve_every + 1]


# ----------------------------------------------------------------------------------------------------------------
# Pictures and the report
# ----------------------------------------------------------------------------------------------------------------


def plot_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, top: float,
               lines: dict[str, tuple[list[tuple[int, float]], tuple[int, int, int]]],
               references: dict[str, tuple[float, tuple[int, int, int]]]):
    """One line chart in box (x0, y0, x1, y1): y from 0 to top, solid lines of (step, value) and dashed references."""
    x0, y0, x1, y1 = box
    max_step = max(step for points, _ in lines.values() for step, _ in points)
    to_xy = lambda step, value: (x0 + (x1 - x0) * step / max_step, y1 - (y1 - y0) * min(value, top) / top)
    draw.line([to_xy(0, 0), to_xy(max_step, 0)], fill="black")
    draw.line([to_xy(0, 0), to_xy(0, top)], fill="black")
    for tick in np.linspace(0, top, 5)[1:]:
        x, y = to_xy(0, tick)
        draw.text((x - 36, y - 6), f"{tick:.2f}", fill="black")
    draw.text(((x0 + x1) // 2 - 50, y1 + 18), f"train steps (max {max_step})", fill="black")
    draw.text((x0, y0 - 34), title, fill="black")
    for name, (value, colour) in references.items():
        (xa, y), (xb, _) = to_xy(0, value), to_xy(max_step, value)
        for x in range(int(xa), int(xb), 12):
            draw.line([(x, y), (min(x + 6, xb), y)], fill=colour, width=2)
        draw.text((xb - 90, y - 14), name, fill=colour)
    for i, (name, (points, colour)) in enumerate(lines.items()):
        draw.line([to_xy(*p) for p in points], fill=colour, width=3)
        draw.text((x1 - 60, y0 + 14 * i), name, fill=colour)


CURVE_COLOURS = {"l2p": (200, 40, 40), "scratch": (40, 90, 200), "l2p_real": (230, 150, 20)}


def plot_curve(curve: list[dict], reference: dict[str, float], path: Path, size=(1100, 420)):
    """Left: ShapeEval against training steps (the source and ground truth dashed); then the validation loss on v
    and on x0 (from step 0 on, where the losses of a fresh head are off the scale: the axes start at step 1)."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    W, H = size
    colours = {name: c for name, c in CURVE_COLOURS.items() if name in curve[0]}
    plot_panel(draw, (60, 60, W * 5 // 11 - 30, H - 50), "ShapeEval overall", 1.0,
               {name: ([(p["step"], p[name]) for p in curve], c) for name, c in colours.items()},
               {"source": (reference["source"], (120, 120, 120)),
                "ground truth": (reference["ground truth"], (180, 180, 180))})
    trained = [p for p in curve if p["step"]] or curve
    for i, (key, title) in enumerate((("val_loss", "validation loss (v)"), ("val_x0_loss", "validation loss (x0)"))):
        x0 = W * 5 // 11 + 60 + i * (W * 6 // 11) // 2
        top = max(p[f"{name}_{key}"] for p in trained for name in colours) * 1.1
        plot_panel(draw, (x0, 60, x0 + (W * 6 // 11) // 2 - 80, H - 50), title, top,
                   {name: ([(p["step"], p[f"{name}_{key}"]) for p in trained], c) for name, c in colours.items()},
                   {})
    img.save(path)


def save_grid(columns: dict[str, np.ndarray], prompts: list[str], path: Path, rows: int = 8):
    """One row per prompt (written at its right), one column per model, headed by its name; same seed in a row."""
    rows = min(rows, *(len(images) for images in columns.values()))
    tiles = model.image_grid([columns[name][i] for i in range(rows) for name in columns], len(columns), gap=2)
    header, margin, tile = 16, 300, SIZE + 2
    img = Image.new("RGB", (tiles.shape[1] + margin, tiles.shape[0] + header), "white")
    img.paste(Image.fromarray(tiles), (0, header))
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(columns):
        draw.text((j * tile + 2, 2), name, fill="black")
    for i in range(rows):
        draw.text((tiles.shape[1] + 8, header + i * tile + SIZE // 2 - 6), prompts[i], fill="black")
    img.save(path)


def write_report(results: dict, out: Path, suffix: str):
    loss = lambda value: "-" if value is None else f"{value:.4f}"  # curves cached before the metric existed lack it
    scores = results["scores"]
    names = list(scores)
    lines = [f"# bench/shapes.py ({results['mode']}, L2P {results['name']}: recipe {results['recipe']})", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in [*shapeworld.TASKS, "overall"]:
        row = [scores[n]["per_task"][task] if task != "overall" else scores[n]["overall"] for n in names]
        lines.append(f"| {task} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", f"L2P / source: {results['l2p_over_source']:.1%} (the paper's GenEval ratio: 93%); first step "
              "where L2P reaches a share of the source (scratch there): " + ", ".join(
                  f"{share} at {m['step']} ({m['scratch']:.3f})" if m else f"{share} not reached"
                  for share, m in results["milestones"].items()),
              f"trainable fraction: L2P {results['trainable_fraction']['l2p']:.1%}, scratch 100%", "",
              "| step | model | ShapeEval | validation loss | x0 validation loss | training-state x0 loss | prompt "
              "effect |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {name} | {p[name]:.3f} | {p[name + '_val_loss']:.4f} | "
              f"{p[name + '_val_x0_loss']:.4f} | {loss(p.get(name + '_train_state_x0_loss'))} | "
              f"{p[name + '_prompt_effect']:.3f} |" for p in results["curve"] for name in CURVE_COLOURS if name in p]
    lines += ["", "Ablation: L2P recipes run in this folder (`--recipe`), the converted model (step 0) and the last "
              "curve point; time = training + curve evaluations", "",
              "| recipe | step | ShapeEval | " + " | ".join(shapeworld.TASKS) + " | validation loss | "
              "x0 validation loss | training-state x0 loss | prompt effect | seconds |",
              "|---|" + "---|" * (len(shapeworld.TASKS) + 7)]
    for name, row in results["ablation"].items():
        for p in (row["first"], row["last"]):
            lines.append(f"| {name} | {p['step']} | {p['overall']:.3f} | " + " | ".join(
                f"{p['score']['per_task'][t]:.3f}" for t in shapeworld.TASKS) + f" | {p['val_loss']:.4f} | "
                f"{p['val_x0_loss']:.4f} | {loss(p.get('train_state_x0_loss'))} | {p['prompt_effect']:.3f} | "
                f"{row['seconds'] or 0:.0f} |")
    lines += ["", "| stage | seconds | code |", "|---|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} | {results['code'].get(stage, '-')} |"
              for stage, seconds in results["seconds"].items()]
    model.atomic_write(out / f"results{suffix}.md", ("\n".join(lines) + "\n").encode())
    model.atomic_write(out / f"results{suffix}.json", json.dumps(results, indent=2).encode())


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the sizes that measure the claim (<= 60 min on 2 cores)")
    parser.add_argument("--real-data", action="store_true",
                        help="also train L2P on ground-truth renders of the corpus prompts instead of the source's "
                             "samples (the paper's data ablation): one more curve")
    parser.add_argument("--recipe", choices=model.RECIPES, default=DEFAULT_RECIPE,
                        help="convert.py's recipe for L2P (scratch keeps its own). Runs of several recipes in one "
                             "--runs folder share the source, corpus and scratch stages, and the report gains an "
                             "ablation table of every recipe found there")
    parser.add_argument("--train-flags", default="", help="more train.py flags for L2P, after the recipe's (e.g. "
                        "\"--trainable shallow --lr 1e-4\"): an ablation; name its curve with --name")
    parser.add_argument("--convert-flags", default="", help="more convert.py flags for L2P's init (e.g. "
                        "\"--head-tokens norm\"): an ablation of the conversion; needs --name, under which its init "
                        "is cached")
    parser.add_argument("--name", help="the L2P curve's name in the report and the cache (default: the recipe)")
    parser.add_argument("--steps", type=int,
                        help="train L2P and scratch this many steps instead of the plan's (quick 600, full 4,000): "
                             "their curves continue from a shorter run in the same --runs folder, and a killed run "
                             "continues from its last curve point")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for every stage")
    parser.add_argument("--runs", help="where stages are cached (default bench/runs/shapes-quick or shapes-full, "
                                       "+ -flux2 for that family; with --eval-source, where its log goes: bench/runs)")
    parser.add_argument("--fresh", action="store_true", help="redo every stage (the shipped source is kept)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evaluation prompts, the corpus and the inits")
    parser.add_argument("--train-source", action="store_true",
                        help="train the toy source and write it to bench/toy-source/ (resumes from "
                             "bench/runs/train-source/; ~4-5 h on 2 CPU cores, minutes on a GPU)")
    parser.add_argument("--family", choices=["zimage", "flux2"], default="zimage",
                        help="the source family: Z-Image's toy (bench/toy-source/) or FLUX.2 [klein]'s "
                             "(bench/toy-source-flux2/, trained into bench/runs/train-source-flux2/); its runs go to "
                             "bench/runs/shapes-quick-flux2 or shapes-full-flux2")
    parser.add_argument("--eval-source", action="store_true",
                        help="re-measure the shipped source's ShapeEval and VAE reconstructions against its manifest")
    args = parser.parse_args(argv)
    if (args.convert_flags or args.train_flags) and (not args.name or args.name in model.RECIPES):
        raise SystemExit("--convert-flags and --train-flags make another run: name it (and its curve) with a --name "
                         f"that is not a recipe's ({', '.join(model.RECIPES)})")
    if args.name in model.RECIPES and args.name != args.recipe:
        raise SystemExit(f"--name {args.name} is the {args.name} recipe's: pass --recipe {args.name} or another --name")
    try:  # the scripts' own checks of these flags, now rather than after minutes of earlier stages
        convert.parse_args(["--src", "x", "--out", "x.safetensors", "--recipe", args.recipe,
                            *shlex.split(args.convert_flags)])
        train.parse_args(["--init", "x", "--data", "x", "--out", "x", *shlex.split(args.train_flags)])
    except ValueError as e:
        raise SystemExit(f"--convert-flags / --train-flags: {e}") from None
    return args


def write_json(path: Path, value):
    """Atomically: a stage killed mid-write leaves no file that a later run would trust as finished."""
    model.atomic_write(path, json.dumps(value).encode())


def real_data_corpus(corpus: Path, out: Path, plan: Plan, seed: int):
    """The synthetic corpus's prompts and cached features with ground-truth renders instead of the source's
    samples: for each prompt, `corpus_seeds` scenes of exactly that caption (drawn until one matches)."""
    rows = [json.loads(line) for line in (corpus / "metadata.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed + 11)
    task_of = {s.caption: s.task for s in shapeworld.make_scenes(plan.corpus_prompts, seed + 7)}
    (out / "images").mkdir(parents=True, exist_ok=True)
    real = []
    for row in rows:
        scene = shapeworld.make_scene(rng, task_of[row["prompt"]])
        while scene.caption != row["prompt"]:
            scene = shapeworld.make_scene(rng, task_of[row["prompt"]])
        model.save_png(out / row["file_name"], shapeworld.render(scene, SIZE))
        real.append({"file_name": row["file_name"], "prompt": row["prompt"],
                     "features": str(Path("..") / corpus.name / row["features"])})
    write_json_lines = "".join(json.dumps(r) + "\n" for r in real)
    model.atomic_write(out / "metadata.jsonl", write_json_lines.encode())


def main(argv=None, plan: Plan | None = None, source: Path | None = None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # CPU: arithmetic on subnormal floats is many times slower
    source = source or toysource.SOURCES[args.family]
    if args.train_source:
        work = ROOT / "bench" / "runs" / ("train-source" + ("" if args.family == "zimage" else f"-{args.family}"))
        return toysource.train_source(toysource.SourcePlan(), work, args.device, args.seed, source, args.family)
    manifest = toysource.check_source(source)
    if args.eval_source:
        return eval_source(source, manifest, args.device, Path(args.runs or ROOT / "bench" / "runs"))
    mode = "full" if args.full else "quick"
    plan = plan or (FULL if args.full else QUICK)
    out = Path(args.runs or ROOT / "bench" / "runs" / f"shapes-{mode}{'' if args.family == 'zimage' else '-flux2'}")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--runs {out} is a file: pass a folder")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    source_id = {"plan": asdict(plan), "source": manifest["files"], "seed": args.seed}
    # a cache from before plan.json recorded the seed was made with the default one
    if plan_file.exists() and {"seed": 0, **json.loads(plan_file.read_text())} != source_id:
        raise SystemExit(f"{out} holds stages of another plan, source or --seed ({plan_file}); pass --fresh to redo "
                         "them, or another --runs folder")
    write_json(plan_file, source_id)
    if args.steps is not None:
        if args.steps <= 0 or args.steps % plan.curve_every:
            raise SystemExit(f"--steps {args.steps}: use a positive multiple of the curve's interval "
                             f"({plan.curve_every} steps in the {mode} plan)")
        plan = replace(plan, pixel_steps=args.steps)
    log_file, seconds_file, device = out / "scripts.log", out / "seconds.json", args.device
    # wall time per stage, kept with the cache: a report built from cached stages still shows what each one cost
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    # and the code's commit per stage (a curve resumed under another commit names both)
    code_file, commit = out / "code.json", toysource.commit(out)
    code = json.loads(code_file.read_text()) if code_file.exists() else {}

    def record(name: str, begin: float, resumed: bool = False):
        seconds[name] = (seconds.get(name, 0) if resumed else 0) + time.time() - begin
        if not resumed or name not in code:
            code[name] = commit
        elif not code[name].endswith(commit):
            code[name] += f", then {commit}"
        write_json(seconds_file, seconds)
        write_json(code_file, code)
    corpus = out / "corpus"

    scenes = toysource.eval_scenes(plan.eval_prompts, args.seed)
    eval_prompts = out / "eval_prompts.txt"
    eval_prompts.write_text("\n".join(s.caption for s in scenes) + "\n")
    corpus_prompts = out / "corpus_prompts.txt"
    corpus_prompts.write_text("\n".join(s.caption for s in shapeworld.make_scenes(plan.corpus_prompts, args.seed + 7))
                              + "\n")

    def stage(name: str, build, done: Path, keep_json: bool = False):
        """Run one stage unless `done` shows it finished; with keep_json, build's dict is kept in `done`."""
        if done.exists():
            return json.loads(done.read_text()) if keep_json else None
        begin = time.time()
        value = build()
        if keep_json:
            write_json(done, value)
        record(name, begin)
        return value

    truth = np.stack([shapeworld.render(s, SIZE) for s in scenes])

    def vae_score():
        vae = model.load_vae(source)
        with torch.no_grad():
            recon = model.to_uint8(vae.decode(vae.encode(toysource.to_tensor(truth))))
        return shapeworld.score(list(recon), scenes)

    # every sampled image: (prompt index, seed), seed-major so that the first len(scenes) are distinct prompts
    sampled = [(i, k) for k in range(plan.eval_seeds) for i in range(len(scenes))]
    sampled_scenes = [scenes[i] for i, _ in sampled]

    def read_samples(folder: Path, suffix: str = "") -> np.ndarray:
        return np.stack([np.asarray(Image.open(folder / f"{i:03d}_s{k}{suffix}.png").convert("RGB"))
                         for i, k in sampled])

    def source_score():
        sample_with_script(out / "samples_source", eval_prompts, plan, log_file, device, latent=source)
        return shapeworld.score(list(read_samples(out / "samples_source", "_latent")), sampled_scenes)

    scores = {"ground truth": shapeworld.score(list(truth), scenes),
              "vae": stage("vae reconstructions", vae_score, out / "score_vae.json", keep_json=True),
              "source": stage("source samples", source_score, out / "score_source.json", keep_json=True)}
    source_images = read_samples(out / "samples_source", "_latent")
    log(f"ShapeEval: ground truth {scores['ground truth']['overall']:.3f}, vae {scores['vae']['overall']:.3f}, "
        f"source {scores['source']['overall']:.3f} (its manifest, full protocol: "
        f"{manifest['shapeeval']['overall']:.3f})")

    stage("synth.py corpus", lambda: script(
        "synth.py", "--src", source, "--prompts", corpus_prompts, "--out", corpus, "--seeds", plan.corpus_seeds,
        "--res", SIZE, "--steps", plan.sample_steps, "--cfg", plan.source_cfg,
        "--shift", toysource.sampler_shift(args.family, plan.sample_steps),
        "--batch-size", 64, "--device", device, "--dtype", "fp32", log_file=log_file), corpus / "metadata.jsonl")
    recipe, l2p_name = args.recipe, args.name or args.recipe
    init = out / f"l2p-{l2p_name if args.convert_flags else recipe}-init.safetensors"
    scratch_init = out / "scratch-init.safetensors"
    align = ["--align-data", corpus] if recipe in ("embedder", "lift") else []
    align += ["--head-steps", plan.head_steps] if recipe == "lift" else []
    stage(f"convert.py --recipe {recipe}" + (f" ({l2p_name})" if args.convert_flags else ""), lambda: script(
        "convert.py", "--src", source, "--out", init, "--patch", 16, "--head-width", HEAD_WIDTH, "--seed", args.seed,
        "--recipe", recipe, *align, *shlex.split(args.convert_flags), log_file=log_file), init)
    source_cfg = model.open_checkpoint(source).cfg
    if not scratch_init.exists():
        random_pixel_init(scratch_init, args.seed, source_cfg)
    scratch_flags = ["--lr", plan.pixel_lr, "--head-lr-fan-in", plan.head_lr_fan_in]
    l2p_flags = recipe_flags(plan, recipe) + shlex.split(args.train_flags)
    runs = [("l2p", f"l2p-{l2p_name}", init, corpus, plan.train_blocks, l2p_flags),
            ("scratch", "scratch", scratch_init, corpus, model.block_count(source_cfg) // 2, scratch_flags)]
    if args.real_data:
        stage("ground-truth corpus", lambda: real_data_corpus(corpus, out / "corpus_real", plan, args.seed),
              out / "corpus_real" / "metadata.jsonl")
        runs.append(("l2p_real", f"l2p_real-{l2p_name}", init, out / "corpus_real", plan.train_blocks, l2p_flags))

    text = model.load_text_encoder(source, dtype=torch.float32)
    val_cap, val_mask = text.encode([s.caption for s in sampled_scenes])
    empty_cap = text.encode([""])[0]
    del text

    vae = model.load_vae(source)

    def score_pixel(ckpt: Path, tag: str, source_states: bool) -> tuple[dict, float, float, float, float]:
        sample_with_script(out / f"samples_{tag}", eval_prompts, plan, log_file, device, ckpt=ckpt,
                           text_encoder=source)
        score = shapeworld.score(list(read_samples(out / f"samples_{tag}")), sampled_scenes)
        return score, *validation_metrics(ckpt, toysource.to_tensor(source_images), val_cap, val_mask, empty_cap,
                                          vae, source_states)

    curves, pixel_images, freeze = {}, {}, {}
    for name, tag, start, data, blocks, flags in runs:
        begin, curve_file = time.time(), out / f"curve_{tag}.json"
        points_before = len(json.loads(curve_file.read_text())) if curve_file.exists() else 0
        train_args = train.parse_args(["--init", str(start), "--data", str(data), "--out", str(out / f"run_{tag}"),
                                       *map(str, flags)])
        train.recipe_defaults(train_args, model.open_checkpoint(start).cfg)  # what train.py will train, on what
        if train_args.states == "source":  # the sampler's states are made through the source's VAE
            flags = [*flags, "--vae", source]
        freeze[name] = dict(strict=train_args.strict_freeze, head_only=train_args.trainable == "head")
        curves[name] = train_with_curve(tag, start, data, out / f"run_{tag}", plan, blocks, flags,
                                        partial(score_pixel, source_states=train_args.states == "source"), log_file,
                                        device, curve_file)
        if len(json.loads(curve_file.read_text())) > points_before:
            record(f"train.py + sample.py: {tag}", begin, resumed=points_before > 0)
        scores[name] = curves[name][-1]["score"]
        pixel_images[name] = read_samples(out / f"samples_{tag}_step{curves[name][-1]['step']}")
    ablation = {path.stem.removeprefix("curve_l2p-"): json.loads(path.read_text())
                for path in sorted(out.glob("curve_l2p-*.json"))}

    l2p_cfg = model.open_checkpoint(init).cfg
    with torch.device("meta"):
        toy = model.new_model(l2p_cfg)
    trainable, frozen = model.set_trainable(toy, plan.train_blocks, **freeze["l2p"])
    curve = [{"step": points[0]["step"], **{k: v for name, p in zip(curves, points) for k, v in (
        (name, p["overall"]), (f"{name}_val_loss", p["val_loss"]), (f"{name}_val_x0_loss", p["val_x0_loss"]),
        (f"{name}_train_state_x0_loss", p.get("train_state_x0_loss")), (f"{name}_prompt_effect", p["prompt_effect"]))}}
        for points in zip(*curves.values())]
    # the paper's GenEval ratio (L2P / source) is 0.93: the first curve point where L2P reaches each share of the source
    milestones = {f"{share:.0%}": next(({"step": p["step"], "l2p": p["l2p"], "scratch": p["scratch"]} for p in curve
                                        if p["l2p"] >= share * scores["source"]["overall"]), None)
                  for share in (0.5, 0.8, 0.93)}
    results = {
        "mode": mode, "name": l2p_name, "recipe": recipe, "plan": asdict(plan), "milestones": milestones,
        "source": {"sha256": hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest(),
                   "shapeeval_full_protocol": manifest["shapeeval"]["overall"], "commit": manifest["commit"]},
        "overall": {name: scores[name]["overall"] for name in scores},
        "scores": scores, "curve": curve,
        "l2p_over_source": scores["l2p"]["overall"] / max(scores["source"]["overall"], 1e-9),
        "trainable_fraction": {"l2p": trainable / (trainable + frozen), "scratch": 1.0},
        "seconds": {**seconds, "total": sum(seconds.values())}, "code": code,
        "ablation": {name: {"first": points[0], "last": points[-1],
                            "seconds": seconds.get(f"train.py + sample.py: l2p-{name}")}
                     for name, points in ablation.items()},
    }
    suffix = "" if l2p_name == DEFAULT_RECIPE else f"-{l2p_name}"
    plot_curve(curve, {"source": scores["source"]["overall"], "ground truth": scores["ground truth"]["overall"]},
               out / f"curve{suffix}.png")
    save_grid({"source": source_images, **pixel_images}, [s.caption for s in sampled_scenes], out / f"grid{suffix}.png")
    save_grid({"source": source_images, "l2p step 0": read_samples(out / f"samples_l2p-{l2p_name}_step0")},
              [s.caption for s in sampled_scenes], out / f"grid_step0{suffix}.png")  # the converted model, untrained
    write_report(results, out, suffix)
    print((out / f"results{suffix}.md").read_text())
    print(out / f"results{suffix}.json")
    return results


def eval_source(source: Path, manifest: dict, device: str, work: Path) -> dict:
    """--eval-source: the shipped source's ShapeEval (its manifest's protocol) and VAE reconstructions, again."""
    plan = toysource.SourcePlan(**manifest["plan"])
    work.mkdir(parents=True, exist_ok=True)
    score = toysource.score_source(source, plan, device, work / "eval-source.log")
    recon = toysource.vae_score(model.load_vae(source), plan, "cpu")
    for name, now, then in (("source", score, manifest["shapeeval"]), ("VAE", recon, manifest["vae_reconstructions"])):
        print(f"{name}: ShapeEval {now['overall']:.3f} (manifest {then['overall']:.3f}, difference "
              f"{now['overall'] - then['overall']:+.3f}); " +
              ", ".join(f"{task} {value:.2f}" for task, value in now["per_task"].items()))
    return {"shapeeval": score, "vae_reconstructions": recon}


if __name__ == "__main__":
    main()
