"""Device check of train.py at real size (6.17B L2P, 1024^2) on one CUDA GPU: measured peak GPU memory against the
memory plan, in low-memory and standard mode, and the speed of each. Random weights and data (nothing downloaded).

    python bench/train_gpu_check.py <work dir> [--steps 3] [--batch-size 2]

Prints one JSON line per mode; needs ~13 GB of disk for the random init and ~45 GB of host memory (low memory).
"""

import argparse
import gc
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import train  # noqa: E402


def write_random_init(path: Path):
    """The real-size L2P layout with random bf16 weights (norm gains 1), made on the GPU one tensor at a time."""
    with torch.device("meta"):
        specs = {k: v.to(torch.bfloat16) for k, v in
                 model.ZImageDiT(model.l2p_config(model.ZImageConfig(), 16)).state_dict().items()}

    def tensors():
        g = torch.Generator("cuda").manual_seed(0)
        for key, spec in specs.items():
            if spec.ndim == 1:
                t = torch.ones(spec.shape) if "norm" in key else torch.zeros(spec.shape)
            else:
                t = torch.randn(spec.shape, generator=g, device="cuda") * spec.shape[1] ** -0.5
            yield key, t.to(torch.bfloat16).cpu()

    model.write_safetensors(path, tensors(), {"format": "l2p"}, specs=specs)


def write_data(folder: Path, n: int, res: int, caption_tokens: int):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "features").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        yy, xx = np.mgrid[0:res, 0:res]
        rgb = np.stack([(xx // 4 + 30 * i) % 256, (yy // 4) % 256, np.full_like(xx, 40 * i % 256)], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"images/{i}.png")
        model.write_safetensors(folder / f"features/{i}.safetensors",
                                {"cap": torch.randn(caption_tokens - 9 * i, 2560).to(torch.bfloat16)})
        rows.append({"file_name": f"images/{i}.png", "prompt": f"p{i}", "features": f"features/{i}.safetensors"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def record_phases() -> dict:
    """Peak GPU memory of the forward + backward passes and of the optimizer step, apart (wraps MasterWeights)."""
    phases = {"forward_backward_gib": 0.0, "optimizer_step_gib": 0.0}
    finish, step = train.MasterWeights.finish_backward, train.MasterWeights.step

    def note(phase):
        phases[phase] = max(phases[phase], round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
        torch.cuda.reset_peak_memory_stats()

    def finish_backward(self):
        finish(self)
        note("forward_backward_gib")

    def optimizer_step(self, *a):
        torch.cuda.reset_peak_memory_stats()
        phases["before_step_gib"] = round(torch.cuda.memory_allocated() / 2 ** 30, 2)
        norm = step(self, *a)
        note("optimizer_step_gib")
        return norm

    train.MasterWeights.finish_backward, train.MasterWeights.step = finish_backward, optimizer_step
    return phases


def run_mode(init: Path, data: Path, out: Path, mode: str, args):
    train.main(["--init", str(init), "--data", str(data), "--out", str(out), "--max-steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--micro-batch", "1", "--log-every", "1",
                "--sample-every", str(args.steps), "--sample-steps", "2", "--sample-count", "1",
                "--low-memory" if mode == "low" else "--no-low-memory"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--modes", default="low,standard")
    parser.add_argument("--phases", action="store_true", help="peak memory of each phase (resets the log's peaks)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    init, data = work / "l2p-init-random.safetensors", work / "data"
    start = time.time()
    if not init.exists():
        write_random_init(init)
    write_data(data, 4, 1024, 200)
    print(json.dumps({"setup_s": round(time.time() - start, 1), "gpu": torch.cuda.get_device_name()}), flush=True)
    phases = record_phases() if args.phases else {}
    for mode in args.modes.split(","):
        out = work / f"run-{mode}"
        began = time.time()
        if phases:
            phases.update(dict.fromkeys(phases, 0.0))
        try:
            run_mode(init, data, out, mode, args)
        except BaseException:  # report, then try the next mode
            traceback.print_exc()
            continue
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        plan = next(r for r in rows if r.get("event") == "plan")["plan"]
        steps = [r for r in rows if "loss" in r and "event" not in r]
        print(json.dumps({"mode": mode, "plan_gpu_gib": round(plan["gpu_total"] / 2 ** 30, 2),
                          "plan_host_gib": round(plan["host_total"] / 2 ** 30, 2),
                          "measured_peak_gib": round(max(r["peak_mem_gib"] for r in steps), 2),
                          "ratio": round(max(r["peak_mem_gib"] for r in steps) * 2 ** 30 / plan["gpu_total"], 3),
                          "activations_gib": round(plan["gpu"]["activations"] / 2 ** 30, 2),
                          "losses": [round(r["loss"], 5) for r in steps],
                          "images_per_s": [round(r["images_per_s"], 3) for r in steps],
                          "wall_s": round(time.time() - began, 1), **phases}), flush=True)
        shutil.rmtree(out)  # the disk holds one run's checkpoint (~30 GB) next to the init
        gc.collect()  # the gradient hooks tie the network and its master weights in a cycle
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
