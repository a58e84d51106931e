"""bench/shapes.py end to end at a reduced size: every stage runs through the real scripts and leaves its files.
Quality thresholds live in the benchmark itself, not here."""

import json
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import shapes  # noqa: E402

TINY = replace(shapes.QUICK, vae_steps=30, source_steps=30, train_scenes=256, corpus_prompts=12, corpus_seeds=1,
               pixel_steps=24, pixel_batch=4, curve_every=12, eval_prompts=6, sample_steps=2)


def test_every_stage_runs_and_the_l2p_loss_falls(tmp_path):
    shapes.main(["--runs", str(tmp_path)], plan=TINY)
    repo = tmp_path / "toy-z-image"
    for part in ("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json",
                 "scheduler/scheduler_config.json"):
        assert (repo / part).exists(), part
    rows = (tmp_path / "corpus" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == TINY.corpus_prompts * TINY.corpus_seeds
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["overall"]) == {"ground truth", "vae", "source", "l2p", "scratch"}
    assert results["overall"]["ground truth"] >= 0.98
    assert [p["step"] for p in results["curve"]] == [12, 24]
    assert all(0 < p[f"{name}_val_loss"] < 10 for p in results["curve"] for name in ("l2p", "scratch"))
    assert 0 < results["trainable_fraction"]["l2p"] < 1
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 64 and Image.open(tmp_path / "curve.png").size == (1100, 420)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run_l2p" / "log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2])
    assert "| overall |" in (tmp_path / "results.md").read_text()
