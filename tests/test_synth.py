"""synth.py: the synthetic corpus from a tiny random Z-Image repo, checked against model.py's own sampler; resume after
a kill; two ranks; the built-in prompt generator; clear errors."""

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import model
import synth
from tiny import make_tiny_zimage_repo

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube on a table", "two cats asleep", 'a sign reading "OPEN LATE"']
SEEDS, RES, STEPS = 2, 32, 2
FILES = {f"images/{i:06d}_s{j}.png" for i in range(len(PROMPTS)) for j in range(SEEDS)}


def synth_args(repo, prompts, out, *extra):
    return ["--src", str(repo), "--prompts", str(prompts), "--out", str(out), "--seeds", str(SEEDS),
            "--res", str(RES), "--steps", str(STEPS), *extra]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, written here independently of synth.to_uint8."""
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def cached(path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("cap")


def features_file(out: Path, prompt: str) -> Path:
    return model.caption_features_path(out / "features", prompt)


def image_files(out: Path) -> set[str]:
    return {f"images/{p.name}" for p in (out / "images").iterdir()}


def temp_files(out: Path) -> list[Path]:
    return [p for folder in (out, out / "images", out / "features") for p in folder.glob(".*")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_tiny_zimage_repo(tmp_path_factory.mktemp("src") / "Z-Image-Turbo")


@pytest.fixture(scope="module")
def base_repo(repo, tmp_path_factory):
    """The same weights presented as the base model: only the scheduler differs (shift 6)."""
    root = tmp_path_factory.mktemp("src-base") / "Z-Image"
    root.mkdir()
    for part in ("transformer", "text_encoder", "tokenizer", "vae"):
        (root / part).symlink_to(repo / part)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 6.0}))
    return root


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n" + "\n\n".join(PROMPTS) + "\n  \n")  # blank lines are skipped
    return path


@pytest.fixture(scope="module")
def clean(repo, prompts_file, tmp_path_factory):
    """One uninterrupted single-process run: the corpus the other runs must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    return out, synth.main(synth_args(repo, prompts_file, out))


@pytest.fixture(scope="module")
def reference(repo):
    return (model.load_text_encoder(repo, dtype=torch.float32), model.load_model(repo, dtype=torch.float32),
            model.load_vae(repo))


def test_layout_metadata_and_png_chunks(clean):
    out, summary = clean
    assert summary["written"] == summary["images"] == len(PROMPTS) * SEEDS and summary["skipped"] == 0
    assert image_files(out) == FILES
    assert {p.name for p in (out / "features").iterdir()} == {features_file(out, p).name for p in PROMPTS}
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == sorted(FILES)  # prompt index, then seed index
    for n, row in enumerate(rows):
        i, j = divmod(n, SEEDS)
        assert row == dict(file_name=f"images/{i:06d}_s{j}.png", prompt=PROMPTS[i], seed=i * SEEDS + j,
                           source="Z-Image-Turbo", steps=STEPS, guidance=1.0, shift=3.0, width=RES, height=RES,
                           features=f"features/{features_file(out, PROMPTS[i]).name}")
        with Image.open(out / row["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (RES, RES)
            assert image.text["prompt"] == PROMPTS[i] and image.text["seed"] == str(row["seed"])
            assert image.text["steps"] == str(STEPS) and image.text["source"] == "Z-Image-Turbo"
    config = json.loads((out / "synth_config.json").read_text())
    assert config["steps"] == STEPS and config["guidance"] == 1.0 and config["dtype"] == "fp32"
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (RES * 6, RES)  # 6 thumbnails in one row of up to 8
    assert not temp_files(out)


def test_images_and_features_equal_the_model_sampler(clean, reference):
    out, _ = clean
    text, dit, vae = reference
    images = {}
    for i, prompt in enumerate(PROMPTS):
        cap, mask = text.encode([prompt])
        rows = cap[0, mask[0]].to(torch.bfloat16)  # the cache is bf16, and the DiT is conditioned on the cache
        assert torch.equal(cached(features_file(out, prompt)), rows)
        for j in range(SEEDS):
            expected = model.generate(dit, rows[None], mask[:, mask[0]], [i * SEEDS + j], RES, RES, steps=STEPS,
                                      shift=3.0, vae=vae)
            images[i, j] = pixels(out / f"images/{i:06d}_s{j}.png")
            np.testing.assert_array_equal(images[i, j], uint8(expected)[0])
    assert not np.array_equal(images[0, 0], images[0, 1])  # seeds differ
    assert not np.array_equal(images[0, 0], images[1, 0])  # prompts differ


def test_same_settings_give_bit_identical_images(repo, prompts_file, clean, tmp_path):
    synth.main(synth_args(repo, prompts_file, tmp_path))
    assert image_files(tmp_path) == FILES
    for name in FILES:
        np.testing.assert_array_equal(pixels(tmp_path / name), pixels(clean[0] / name))
    assert (tmp_path / "metadata.jsonl").read_text() == (clean[0] / "metadata.jsonl").read_text()


def test_killed_run_resumes_to_the_full_set_without_trusting_partial_files(repo, prompts_file, clean, tmp_path,
                                                                           monkeypatch):
    saved = []

    def save_then_die(path, *args):
        if len(saved) == 3:
            raise RuntimeError("killed")
        real_save(path, *args)
        saved.append(path)

    real_save = model.save_png
    monkeypatch.setattr(model, "save_png", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        synth.main(synth_args(repo, prompts_file, tmp_path))
    monkeypatch.setattr(model, "save_png", real_save)
    done = image_files(tmp_path)
    assert 3 <= len(done) < len(FILES) and not (tmp_path / "metadata.jsonl").exists()

    # What a kill can leave behind, or a disk can do: a torn image under its final name, temp files of writes in
    # flight (one of them complete-looking), a torn features file.
    torn = tmp_path / sorted(done)[0]
    torn.write_bytes(torn.read_bytes()[:len(torn.read_bytes()) // 2])
    missing = sorted(FILES - done)[0]
    (tmp_path / "images" / f".{Path(missing).name}.999.tmp").write_bytes((clean[0] / missing).read_bytes())
    (tmp_path / "images" / f".{Path(missing).name}.998.tmp").write_bytes(b"\x89PNG partial")
    features = features_file(tmp_path, PROMPTS[1])
    features.write_bytes(features.read_bytes()[:100])
    (tmp_path / "features" / f".{features_file(tmp_path, PROMPTS[2]).name}.tmp").write_bytes(b"partial")

    summary = synth.main(synth_args(repo, prompts_file, tmp_path))
    assert summary["skipped"] == len(done) - 1 and summary["written"] == len(FILES) - len(done) + 1
    assert image_files(tmp_path) == FILES and not temp_files(tmp_path)
    for name in FILES:
        np.testing.assert_array_equal(pixels(tmp_path / name), pixels(clean[0] / name))
    for prompt in PROMPTS:
        assert features_file(tmp_path, prompt).read_bytes() == features_file(clean[0], prompt).read_bytes()
    assert (tmp_path / "metadata.jsonl").read_text() == (clean[0] / "metadata.jsonl").read_text()

    again = synth.main(synth_args(repo, prompts_file, tmp_path))  # a finished corpus: nothing left to do
    assert again["written"] == again["encoded"] == 0 and again["skipped"] == len(FILES)


def test_jobs_split_over_ranks_disjointly_and_completely():
    for jobs in (0, 1, 6, 17):
        for world in (1, 2, 3, 8):
            shares = [list(synth.rank_jobs(jobs, rank, world)) for rank in range(world)]
            assert sorted(k for share in shares for k in share) == list(range(jobs))


def test_two_processes_split_the_corpus(repo, prompts_file, clean, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        argv = synth_args(repo, prompts_file, tmp_path, "--batch-size", "2", "--device", "cpu")
        procs.append(subprocess.Popen([sys.executable, "synth.py", *argv], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    written = [int(log.split(f"rank {r}/2: ")[1].split(" images written")[0]) for r, log in enumerate(logs)]
    assert written == [3, 3]  # 6 jobs, k % 2: each rank made its own three and none of the other's
    assert image_files(tmp_path) == FILES and not temp_files(tmp_path)
    for name in FILES:  # batches of 2 mix caption lengths; on CPU the results still match the unbatched run
        assert np.abs(pixels(tmp_path / name).astype(int) - pixels(clean[0] / name)).max() <= 1
    assert (tmp_path / "metadata.jsonl").read_text() == (clean[0] / "metadata.jsonl").read_text()


def test_source_presets_follow_the_scheduler_shift(repo, base_repo, prompts_file):
    for src, steps, guidance, shift in ((repo, 8, 1.0, 3.0), (base_repo, 50, 5.0, 6.0)):
        args = synth.parse_args(["--src", str(src), "--prompts", str(prompts_file), "--out", "unused"])
        settings, prompts, _ = synth.resolve_settings(args, torch.device("cpu"))
        assert (settings["steps"], settings["guidance"], settings["shift"]) == (steps, guidance, shift)
        assert settings["dtype"] == "fp32" and prompts == PROMPTS


def test_base_model_cfg_uses_the_empty_negative_prompt(base_repo, reference, tmp_path):
    text, dit, vae = reference
    prompts = tmp_path / "one.txt"
    prompts.write_text(PROMPTS[2])
    out = tmp_path / "base"
    synth.main(["--src", str(base_repo), "--prompts", str(prompts), "--out", str(out), "--seeds", "1", "--res", "48",
                "--steps", str(STEPS), "--seed", "7"])  # CFG c = 5 from the base preset (Z-Image's w = 4)
    row = json.loads((out / "metadata.jsonl").read_text())
    assert (row["guidance"], row["shift"], row["seed"], row["source"]) == (5.0, 6.0, 7, "Z-Image")
    cap, mask = text.encode([PROMPTS[2]])
    neg, neg_mask = text.encode([""])
    neg = neg[0, neg_mask[0]].to(torch.bfloat16)
    assert torch.equal(cached(features_file(out, "")), neg)
    expected = model.generate(dit, cap[0, mask[0]].to(torch.bfloat16)[None], mask[:, mask[0]], [7], 48, 48,
                              steps=STEPS, shift=6.0, guidance=5.0, neg_cap=neg[None],
                              neg_mask=torch.ones(1, len(neg), dtype=torch.bool), vae=vae)
    np.testing.assert_array_equal(pixels(out / "images/000000_s0.png"), uint8(expected)[0])


def test_builtin_prompts():
    per_class = 12
    n = len(synth.SUBCLASSES) * per_class
    prompts = synth.builtin_prompts(n)
    assert len(set(prompts)) == n and prompts == synth.builtin_prompts(n)
    assert synth.builtin_prompts(10) == prompts[:10]
    assert synth.read_prompts(f"builtin:{n}") == prompts
    assert len(synth.PROMPT_TAXONOMY) == 4 and len(synth.SUBCLASSES) == 17
    classes = [synth.builtin_category(i) for i in range(n)]
    for (super_class, sub_class), count in collections.Counter(classes).items():
        assert count == per_class
    assert {sup for sup, _ in classes} == set(synth.PROMPT_TAXONOMY)
    # each prompt really is about its sub-class: it names one of that sub-class's subjects
    for prompt, (sup, sub) in zip(prompts, classes):
        subjects = [s.split("{text}")[0] for s in synth.PROMPT_TAXONOMY[sup][sub]["subjects"]]
        assert any(s in prompt for s in subjects), (sub, prompt)
    lengths = np.array([len(p) for p in prompts])
    share = ((lengths >= 200) & (lengths <= 350)).mean()
    quoted = np.mean(['"' in p for p in prompts])
    assert share >= 0.9 and 0.1 <= quoted <= 0.5
    print(f"\n{n} built-in prompts: length min {lengths.min()} / median {np.median(lengths):.0f} / max "
          f"{lengths.max()}, {share:.0%} within 200-350 chars, {quoted:.0%} with quoted text to render")
    histogram = collections.Counter(int(length) // 25 * 25 for length in lengths)
    print("length histogram: " + ", ".join(f"{k}-{k + 24}: {v}" for k, v in sorted(histogram.items())))
    for (sup, sub), count in sorted(collections.Counter(classes).items()):
        print(f"  {sup:15s} {sub:25s} {count}")
    paper = synth.builtin_prompts(10_000)  # the paper's corpus size
    assert len(set(paper)) == 10_000 and paper[:n] == prompts


@pytest.mark.parametrize("content,suffix,match", [
    ("", ".txt", "holds no prompt"),
    ("\n   \n\n", ".txt", "holds no prompt"),
    (b"\xff\xfe\x00bad", ".txt", "cannot read it"),
    ("caption,score\n,1\n", ".csv", "holds no prompt"),
    ("name,score\ncat,1\n", ".csv", "no prompt column"),
    ('{"prompt": "a cat"}\nnot json\n', ".jsonl", "line 2: not valid JSON"),
    ('{"url": "x"}\n', ".jsonl", "no prompt column"),
])
def test_bad_prompt_files_are_refused_clearly(repo, tmp_path, content, suffix, match):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit, match=match):
        synth.main(synth_args(repo, path, tmp_path / "out"))


def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "a cat"}\n\n{"text": " a dog "}\n')
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sleeping"\n2,a dog\n')
    assert synth.read_prompts(str(tmp_path / "p.jsonl")) == ["a cat", "a dog"]
    assert synth.read_prompts(str(tmp_path / "p.csv")) == ["a cat, sleeping", "a dog"]


def test_bad_arguments_are_refused_clearly(repo, base_repo, prompts_file, clean, tmp_path):
    def refused(match, *argv, src=repo, prompts=prompts_file, out=tmp_path / "out"):
        with pytest.raises(SystemExit, match=match):
            synth.main(synth_args(src, prompts, out, *argv))

    refused("cannot read it", prompts=tmp_path / "missing.txt")
    refused("cannot read it", prompts=tmp_path)  # a folder
    refused("positive whole number", prompts="builtin:0")
    refused("positive whole number", prompts="builtin:many")
    refused("multiples of 16", "--res", "40")
    refused("multiples of 16", "--width", "64", "--height", "72")
    refused("--seeds 0: must be at least 1", "--seeds", "0")
    no_vae = tmp_path / "no-vae"
    for part in ("transformer", "text_encoder", "scheduler"):
        (no_vae / part).mkdir(parents=True)
    refused("not a source repo: it has no vae/", src=no_vae)
    no_transformer = tmp_path / "no-transformer"
    for part in ("vae", "text_encoder", "scheduler"):
        (no_transformer / part).mkdir(parents=True)
    refused("not a source repo: it has no transformer/", src=no_transformer)
    refused("not a folder", src=tmp_path / "nowhere")
    # an existing corpus with other settings is never mixed into
    refused("other settings .*steps: 2 there, 3 now", "--steps", "3", out=clean[0])
    refused("other settings .*source: 'Z-Image-Turbo' there, 'Z-Image' now", src=base_repo, out=clean[0])
    other = tmp_path / "other.txt"
    other.write_text("a blue sphere")
    refused("other settings .*prompts_sha256", prompts=other, out=clean[0])
    assert not (tmp_path / "out").exists()  # refused before anything is written
