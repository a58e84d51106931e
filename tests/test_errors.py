"""Every script, given bad input as a user would give it, ends in one clear line and a non-zero exit status, never a
traceback: missing, truncated and non-safetensors checkpoints, the wrong kind of checkpoint, a text encoder that
cannot feed the checkpoint, invalid or non-finite numbers, sizes that are not a multiple of the patch, paths that do
not exist, an empty prompt file."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import convert
from tiny import make_tiny_klein_repo, make_tiny_zimage_repo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    repo = make_tiny_zimage_repo(root / "repo")
    init = root / "init.safetensors"
    convert.main(["--src", str(repo), "--out", str(init), "--recipe", "paper"])
    klein = make_tiny_klein_repo(root / "klein", distilled=False)
    convert.main(["--src", str(klein), "--out", str(root / "klein_init.safetensors"), "--recipe", "paper"])
    data = init.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (root / "junk.safetensors").write_text("this is not a checkpoint")
    (root / "empty.txt").write_text("\n\n")
    (root / "prompts.txt").write_text("a cat\n")
    (root / "data").mkdir()
    (root / "data" / "metadata.jsonl").write_text('{"file_name": "a.png", "prompt": "a cat"}\n')
    shutil.copy(next((repo / "transformer").glob("*.safetensors")), root / "victim.safetensors")  # --out = --src
    (root / "folder.safetensors").mkdir()
    shutil.copytree(repo, root / "damaged")  # a repo with a damaged config.json
    (root / "damaged" / "transformer" / "config.json").write_text("{bad")
    shutil.copytree(repo, root / "mixed")  # a Z-Image repo holding FLUX.2's VAE
    shutil.rmtree(root / "mixed" / "vae")
    shutil.copytree(klein / "vae", root / "mixed" / "vae")
    return root


CASES = [  # script, arguments ({} is the fixture folder), what the one line must say
    ("convert.py", "--src {}/missing --out {}/o.safetensors", "missing does not exist"),
    ("convert.py", "--src {}/truncated.safetensors --out {}/o.safetensors", "not a readable safetensors file"),
    ("convert.py", "--src {}/junk.safetensors --out {}/o.safetensors", "not a readable safetensors file"),
    ("convert.py", "--src {}/repo/vae --out {}/o.safetensors", "not a Z-Image transformer"),
    ("convert.py", "--src {}/repo --out {}/o.safetensors --patch 12", "--patch 12: the Detailer Head needs 16, 32"),
    ("convert.py", "--src {}/repo --out {}/o.bin", "write a .safetensors file"),
    ("sample.py", "--ckpt {}/missing.safetensors --text-encoder {}/repo --prompt x", "does not exist"),
    ("sample.py", "--ckpt {}/truncated.safetensors --text-encoder {}/repo --prompt x", "not a readable safetensors"),
    ("sample.py", "--ckpt {}/junk.safetensors --text-encoder {}/repo --prompt x", "not a readable safetensors"),
    ("sample.py", "--ckpt {}/repo --text-encoder {}/repo --prompt x", "is a latent transformer"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --steps -3", "--steps must be at least 1"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --res 40", "not a multiple of the model"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompts {}/empty.txt", "holds no prompt"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/nowhere --prompt x", "nowhere does not exist"),
    ("train.py", "--init {}/missing.safetensors --data {}/data --out {}/run", "does not exist"),
    ("train.py", "--init {}/truncated.safetensors --data {}/data --out {}/run", "not a readable safetensors file"),
    ("train.py", "--init {}/repo --data {}/data --out {}/run", "latent source checkpoint"),
    ("train.py", "--init {}/init.safetensors --data {}/nowhere --out {}/run", "found no metadata.jsonl"),
    ("train.py", "--init {}/init.safetensors --data {}/data --out {}/run --batch-size 0", "--batch-size must be at least"),
    ("train.py", "--init {}/init.safetensors --data {}/data --out {}/run --res 40", "multiple of the model's patch 16"),
    ("train.py", "--init {}/init.safetensors --data {}/data --out {}/run", "no cached text features"),
    ("synth.py", "--src {}/missing --prompts {}/prompts.txt --out {}/s", "not a folder"),
    ("synth.py", "--src {}/repo --prompts {}/prompts.txt --out {}/s --res 40", "multiples of 16"),
    ("synth.py", "--src {}/repo --prompts {}/prompts.txt --out {}/s --steps -3", "--steps -3: must be at least 1"),
    ("synth.py", "--src {}/repo --prompts {}/missing.txt --out {}/s", "cannot read it"),
    ("synth.py", "--src {}/repo --prompts {}/empty.txt --out {}/s", "holds no prompt"),
    # the Z-Image repo's 3-layer Qwen3 cannot make FLUX.2's features (hidden states 9, 18, 27)
    ("sample.py", "--ckpt {}/klein_init.safetensors --text-encoder {}/repo --prompt x", "checkpoint's source repo"),
    ("train.py", "--init {}/klein_init.safetensors --data {}/data --out {}/run --text-encoder {}/repo",
     "checkpoint's source repo"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --cfg nan",
     "--cfg nan: must be finite"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --seed -1", "--seed must be at least"),
    ("train.py", "--init {}/init.safetensors --data {}/data --out {}/run --lr nan", "--lr nan: must be finite"),
    ("synth.py", "--src {}/repo --prompts {}/prompts.txt --out {}/s --shift inf", "--shift inf: must be finite"),
    ("synth.py", "--src {}/repo --prompts {}/prompts.txt --out {}/s --cfg 0.5", "--cfg 0.5: must be at least 1"),
    ("convert.py", "--src {}/repo --out {}/o.safetensors --head-lr nan", "--head-lr nan: must be finite"),
    ("convert.py", "--src {}/damaged --out {}/o.safetensors", "config.json is not valid JSON"),
    ("sample.py", "--latent {}/damaged --prompt x", "config.json is not valid JSON"),
    ("synth.py", "--src {}/damaged --prompts {}/prompts.txt --out {}/s", "config.json is not valid JSON"),
    ("sample.py", "--latent {}/mixed --prompt x --res 32 --latent-steps 1", "its latent tokens hold 16 values"),
    ("synth.py", "--src {}/mixed --prompts {}/prompts.txt --out {}/s --res 32 --steps 1",
     "its latent tokens hold 16 values"),
    ("convert.py", "--src {}/victim.safetensors --out {}/victim.safetensors --recipe paper",
     "is a file this conversion reads"),
    ("convert.py", "--src {}/repo --out {}/o.safetensors --align-data {} --device bogus", "--device bogus:"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --device bogus", "--device bogus:"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --seed 99999999999999999999",
     "below 2^62"),
    ("synth.py", "--src {}/repo --prompts {}/prompts.txt --out {}/s --seed 99999999999999999999", "below 2^62"),
    ("synth.py", "--src {}/repo --prompts {}/prompts.txt --out {}/s --res 64 --width 0", "image size 0x64"),
    ("sample.py", "--ckpt {}/init.safetensors --init {}/init.safetensors --text-encoder {}/repo --prompt x --res 32 "
     "--steps 1", "drop --init"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --res 32 --steps 2 --cfg 1e300",
     "sampling gave non-finite values"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --res 32 --steps 1 --out {}/o.jpg",
     "writes PNG files into a folder"),
    ("sample.py", "--ckpt {}/init.safetensors --text-encoder {}/repo --prompt x --res 32 --steps 1 --out {}/empty.txt",
     "writes PNG files into a folder"),
    ("convert.py", "--src {}/repo --out {}/folder.safetensors --recipe paper", "write a .safetensors file"),
]


def test_bad_inputs_end_in_one_line_without_a_traceback(files):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failures = []
    for start in range(0, len(CASES), 4):  # a few at a time: each is a Python process importing torch
        batch = CASES[start:start + 4]
        procs = [subprocess.Popen([sys.executable, script, *args.format(*[files] * args.count("{}")).split()],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for script, args, _ in batch]
        for (script, args, expected), proc in zip(batch, procs):
            stdout, stderr = proc.communicate(timeout=120)
            last = (stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            if proc.returncode == 0 or "Traceback" in stderr + stdout or expected not in last:
                failures.append(f"{script} {args}: exit {proc.returncode}, last line {last!r}\n{stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
