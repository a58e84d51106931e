"""
The miniature world's source LDMs: a toy Z-Image and a toy FLUX.2 [klein] (VAE, Qwen3 text encoder, DiT) trained once
on ShapeWorld scenes and shipped in bench/toy-source/ and bench/toy-source-flux2/ in their published layouts, as the
real recipe starts from a downloaded source.

    python bench/shapes.py --train-source [--family flux2] [--device cuda]   # train one (resumes from bench/runs/)
    python bench/shapes.py --eval-source [--family flux2]                    # re-measure it against its manifest

Recipe (measured for this toy in bench/RESULTS.md): the VAE first (reconstruction + a light pull of the latent
toward the origin; its decoder learns on noisy latents, so that it forgives the DiT's inexact samples), then the
DiT and the text encoder together, batch 256, logit-normal sigma, adaLN-Zero, 10% empty captions (for CFG); then
the text encoder is frozen for everything downstream, as the real Qwen3 is. manifest.json records the command, the
commit, the ShapeEval (GenEval protocol: 54 distinct prompts x 4 seeds) and each file's sha256; every run of
bench/shapes.py checks the files against it. The FLUX.2 toy follows its family's recipe: the VAE's latent is 2x2-packed
and normalised by BatchNorm statistics, the caption features are hidden states 9 / 18 / 27 of a 28-layer toy Qwen3
side by side over every position of a short caption length (32 tokens, declared in its tokenizer_config.json), and
the sampler's shift is FLUX.2's exp(mu) for the token count.
"""

import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import model  # noqa: E402
import shapeworld  # noqa: E402

SIZE = 64  # pixels; the real geometry scaled down: VAE x8 -> 8x8 latent, latent patch 2 -> 4x4 tokens = pixel patch 16
SOURCE = ROOT / "bench" / "toy-source"  # the shipped sources (tracked, plain git files)
SOURCES = {"zimage": SOURCE, "flux2": ROOT / "bench" / "toy-source-flux2"}
TOY_DIT = model.ZImageConfig(in_channels=16, patch_size=2, dim=128, n_layers=6, n_refiner_layers=1, n_heads=4,
                             cap_feat_dim=64, axes_dims=(8, 12, 12))
TOY_VAE = model.FluxVAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
TOY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
TOY_FLUX2_DIT = model.Flux2Config(in_channels=64, patch_size=1, num_layers=2, num_single_layers=4,
                                  num_attention_heads=4, attention_head_dim=32, joint_attention_dim=3 * 64,
                                  axes_dims_rope=(8, 8, 8, 8))
TOY_FLUX2_VAE = model.Flux2VAEConfig(latent_channels=16, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                                     norm_num_groups=8)
TOY_FLUX2_TEXT = {**TOY_TEXT, "num_hidden_layers": 28}  # hidden state 27 is a layer's output, not the final norm's
FLUX2_CAPTION_TOKENS = 32  # the toy recipe's caption length: every caption with the chat template fits
SHIFT = 3.0  # the source's sampler shift (Z-Image-Turbo's; bench/RESULTS.md compares it with shift 1)
# The decoder learns on noisy latents: with 0.25 of the latent's spread in training, latents with 0.4 unit of noise
# still decode to 0.979 ShapeEval (0.990 clean). Relative to the spread, so the encoder cannot outgrow the noise.
VAE_LATENT_NOISE = 0.25
VAE_POOL = 2000  # scenes rendered once for the VAE (rendering is cheap, but not free at every step)


@dataclass(frozen=True)
class SourcePlan:
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 3e-3
    scenes: int = 20000  # rendered scenes the DiT learns from
    steps: int = 9000  # DiT + text encoder steps of `batch` samples (2.3M; the curve: bench/RESULTS.md)
    batch: int = 256
    lr: float = 2e-3
    warmup: int = 100
    decay_from: float = 0.75  # constant lr, then a cosine to 10% over the last quarter
    cfg_drop: float = 0.1  # share of empty captions
    eval_prompts: int = 72  # GenEval protocol: 54 distinct prompts (tasks with fewer captions give fewer) ...
    eval_seeds: int = 4  # ... x 4 seeds
    sample_steps: int = 30
    cfg: float = 3.0  # v_neg + c (v_pos - v_neg)
    eval_every: int = 2000
    save_every: int = 250


def log(msg: str):
    print(f"[toy source {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def render(scenes) -> torch.Tensor:
    return to_tensor(np.stack([shapeworld.render(s, SIZE) for s in scenes]))


def eval_scenes(n_prompts: int, seed: int = 0) -> list:
    """Distinct prompts, n_prompts / 6 per task in task-cycled order (single_object has only 3 captions, two_object
    6, counting 9). Repeating a prompt would only repeat its images: seeds, not prompts, give the spread."""
    rng = np.random.default_rng(seed + 1000)
    share = n_prompts // len(shapeworld.TASKS)
    by_task = {}
    for task in shapeworld.TASKS:
        found = {}
        for _ in range(100 * share):  # enough draws to exhaust a task's captions when it has fewer than `share`
            scene = shapeworld.make_scene(rng, task)
            found.setdefault(scene.caption, scene)
            if len(found) == share:
                break
        by_task[task] = list(found.values())
    return [scenes[j] for j in range(share) for scenes in by_task.values() if j < len(scenes)]


# ----------------------------------------------------------------------------------------------------------------
# Components in the published layout
# ----------------------------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path, max_length: int | None = None):
    """A word-level tokenizer over the scene vocabulary with Qwen's special tokens and chat template; max_length:
    the caption length a recipe declares (model_max_length, read by model.TextEncoder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
    words = ["user", "assistant", *shapeworld.caption_vocabulary()]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                "{%- endif %}{%- endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", padding_side="right", chat_template=template,
                                        **({"model_max_length": max_length} if max_length else {}))
    tokenizer.save_pretrained(folder)
    return tokenizer


def new_text_encoder(vocab_size: int, pad_id: int, seed: int, sizes: dict = TOY_TEXT):
    """A small random Qwen3 (the causal LM, as published: keys model.*, tied lm_head)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=pad_id, rms_norm_eps=1e-6, **sizes)
    text = Qwen3ForCausalLM(config)
    with torch.no_grad():
        text.model.embed_tokens.weight.normal_()
    return text


def write_component(folder: Path, module: torch.nn.Module, config: dict, weights_name: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
             for k, v in module.state_dict().items()}
    model.write_safetensors(folder / weights_name, state)


def dit_config_json(cfg: "model.ZImageConfig | model.Flux2Config") -> dict:
    if cfg.family == "flux2":
        published = ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio", "axes_dims_rope", "rope_theta",
                     "eps")
        return {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "out_channels": None,
                "guidance_embeds": False, **{k: getattr(cfg, k) for k in published}}
    return {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [cfg.patch_size], "all_f_patch_size": [1],
            "in_channels": cfg.in_channels, "dim": cfg.dim, "n_layers": cfg.n_layers,
            "n_refiner_layers": cfg.n_refiner_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
            "norm_eps": cfg.norm_eps, "qk_norm": True, "cap_feat_dim": cfg.cap_feat_dim, "rope_theta": cfg.rope_theta,
            "t_scale": cfg.t_scale, "axes_dims": list(cfg.axes_dims), "axes_lens": [1536, 512, 512]}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def cosine_lr(peak: float, step: int, steps: int, warmup: int = 50) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_vae(plan: SourcePlan, seed: int, device, family: str = "zimage") -> "model.FluxVAE | model.Flux2VAE":
    """FLUX's autoencoder architecture, small: reconstruction MSE + a light pull of the latent toward the origin;
    then the family's latent normalisation fitted to it: Z-Image's (mean - shift) * scale, FLUX.2's BatchNorm
    statistics of the 2x2-packed latent."""
    torch.manual_seed(seed)
    flux2 = family == "flux2"
    vae = (model.Flux2VAE(replace(TOY_FLUX2_VAE)) if flux2 else  # a copy: the fitted factors go into vae.cfg
           model.FluxVAE(replace(TOY_VAE))).to(device)
    channels = vae.cfg.latent_channels
    posterior = (lambda x: vae.quant_conv(vae.encoder(x))) if flux2 else vae.encoder
    decode = (lambda z: vae.decoder(vae.post_quant_conv(z))) if flux2 else vae.decoder
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pool = render([shapeworld.make_scene(rng) for _ in range(VAE_POOL)]).to(device)
    g = torch.Generator().manual_seed(seed)
    for step in (bar := tqdm(range(plan.vae_steps), desc="toy VAE", unit="step")):
        x = pool[torch.randint(len(pool), (plan.vae_batch,), generator=g).to(device)]
        mean = posterior(x)[:, :channels]
        z = mean + VAE_LATENT_NOISE * mean.detach().std() * torch.randn_like(mean)
        loss = F.mse_loss(decode(z), x) + 1e-4 * mean.square().mean()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(plan.vae_lr, step, plan.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        mean = posterior(render(shapeworld.make_scenes(256, seed + 1)).to(device))[:, :channels]
        if flux2:
            packed = F.pixel_unshuffle(mean, vae.cfg.patch_size[0])
            vae.bn.running_mean.copy_(packed.mean((0, 2, 3)))
            vae.bn.running_var.copy_(packed.var((0, 2, 3)))
    if not flux2:
        vae.cfg.shift_factor, vae.cfg.scaling_factor = float(mean.mean()), float(1 / mean.std())
    return vae.eval()


def tokenize(tokenizer, captions: list[str], family: str = "zimage") -> dict[str, torch.Tensor]:
    """Caption -> its token ids under the chat template, exactly as model.TextEncoder tokenizes (FLUX.2's recipe
    without thinking), unpadded."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=family != "flux2")
             for c in captions]
    return {c: torch.tensor(ids) for c, ids in zip(captions, tokenizer(texts)["input_ids"])}


def encode(text_model, ids: list[torch.Tensor], pad_id: int, device, family: str = "zimage"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The features model.TextEncoder gives, with gradients: Z-Image's (its truncated Qwen3's last hidden state, pads
    zeroed), or FLUX.2's (hidden states 9 / 18 / 27 side by side at every position of the caption length)."""
    if family == "flux2":
        ids = [*ids, torch.zeros(FLUX2_CAPTION_TOKENS, dtype=torch.long)]  # pads every caption to the length
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id).to(device)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(i), dtype=torch.bool) for i in ids], batch_first=True)
    mask = mask.to(device)
    if family == "flux2":
        input_ids, mask = input_ids[:-1], mask[:-1]
        hidden = text_model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                            output_hidden_states=True).hidden_states
        return torch.cat([hidden[k] for k in model.FLUX2_TEXT_LAYERS], dim=-1), torch.ones_like(mask)
    cap = text_model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    return cap.masked_fill(~mask[..., None], 0), mask


def adaln_zero_(dit: "model.ZImageDiT | model.Flux2DiT"):
    """adaLN-Zero, as far as Z-Image's layout allows (its adaLN has scales and tanh gates, no shifts): zero
    modulations make every block start as the identity, and a zero final layer predicts v = 0. FLUX.2's shared
    modulations and output layer have no biases."""
    with torch.no_grad():
        if dit.cfg.family == "flux2":
            for linear in (dit.double_stream_modulation_img.linear, dit.double_stream_modulation_txt.linear,
                           dit.single_stream_modulation.linear, dit.norm_out.linear, dit.proj_out):
                linear.weight.zero_()
            return
        for block in [*dit.noise_refiner, *dit.layers]:
            block.adaLN_modulation[0].weight.zero_()
            block.adaLN_modulation[0].bias.zero_()
        final = dit.all_final_layer[f"{dit.cfg.patch_size}-1"]
        for layer in (final.adaLN_modulation[1], final.linear):
            layer.weight.zero_()
            layer.bias.zero_()


def train_dit(plan: SourcePlan, vae, work: Path, seed: int, device, evaluate, family: str = "zimage") -> dict:
    """The toy DiT and text encoder together, by flow matching on the VAE's latents; checkpoints every save_every
    steps in work/dit.pt, from which a killed run resumes exactly (every draw is seeded by the step)."""
    flux2 = family == "flux2"
    tokenizer = write_tokenizer(work / "tokenizer", FLUX2_CAPTION_TOKENS if flux2 else None)
    text_full = new_text_encoder(len(tokenizer), tokenizer.pad_token_id, seed, TOY_FLUX2_TEXT if flux2 else TOY_TEXT)
    text_full.save_pretrained(work / "text_encoder-init")
    text = model.qwen3_from_tensors(text_full.config, text_full.state_dict().items(), device=device,
                                    dtype=torch.float32,  # what load_text_encoder builds: the layers it uses
                                    n_layers=max(model.FLUX2_TEXT_LAYERS) if flux2 else None)
    torch.manual_seed(seed)
    dit = model.new_model(TOY_FLUX2_DIT if flux2 else TOY_DIT).to(device)
    adaln_zero_(dit)
    params = [*dit.parameters(), *text.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.01)
    scenes = shapeworld.make_scenes(plan.scenes, seed + 2)
    ids = tokenize(tokenizer, sorted({s.caption for s in scenes} | {""}), family)
    if flux2 and max(len(i) for i in ids.values()) > FLUX2_CAPTION_TOKENS:
        raise SystemExit(f"a caption is longer than the toy FLUX.2 recipe's {FLUX2_CAPTION_TOKENS} tokens")
    latents_file = work / "latents.pt"
    if not latents_file.exists():
        with torch.no_grad():
            latents = torch.cat([vae.encode(render(scenes[i:i + 256]).to(device)).cpu()
                                 for i in range(0, len(scenes), 256)])
        model.atomic_write(latents_file, lambda f: torch.save(latents, f))
    latents = torch.load(latents_file, weights_only=True).to(device)
    checkpoint, start, history = work / "dit.pt", 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=device)
        dit.load_state_dict(state["dit"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        start, history = state["step"], state["history"]
        log(f"resuming the DiT at step {start} of {plan.steps}")
    for step in (bar := tqdm(range(start, plan.steps), desc="toy DiT + text encoder", unit="step", initial=start,
                             total=plan.steps)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(scenes), (plan.batch,), generator=g)
        drop = torch.rand(plan.batch, generator=g) < plan.cfg_drop
        cap, mask = encode(text, [ids["" if d else scenes[i].caption] for i, d in zip(idx.tolist(), drop)],
                           tokenizer.pad_token_id, device, family)
        x0 = latents[idx.to(device)]
        sigma = torch.sigmoid(torch.randn(plan.batch, generator=g)).to(device)  # logit-normal
        eps = torch.randn(x0.shape, generator=g).to(device)
        s = sigma.view(-1, 1, 1, 1)
        loss = F.mse_loss(dit((1 - s) * x0 + s * eps, sigma, cap, mask), eps - x0)
        decay = max(0.0, (step - plan.decay_from * plan.steps) / ((1 - plan.decay_from) * plan.steps))
        for group in opt.param_groups:
            group["lr"] = plan.lr * min(1.0, (step + 1) / plan.warmup) * (0.55 + 0.45 * math.cos(math.pi * decay))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % plan.eval_every == 0 and done < plan.steps:
            score = evaluate(dit.eval(), text.eval(), tokenizer)
            dit.train(), text.train()
            history.append({"step": done, "shapeeval": score["overall"], "per_task": score["per_task"]})
            log(f"step {done}: ShapeEval {score['overall']:.3f} ({plan.eval_prompts} prompts x {plan.eval_seeds})")
        if done % plan.save_every == 0 or done == plan.steps:
            state = {"step": done, "dit": dit.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                     "history": history}
            model.atomic_write(checkpoint, lambda f: torch.save(state, f))
    return dict(dit=dit.eval(), text=text.eval(), text_full=text_full, tokenizer=tokenizer, history=history)


def sampler_shift(family: str, steps: int) -> float:
    """The source's sampler shift: Z-Image-Turbo's 3, or FLUX.2's exp(mu) for the toy's token count."""
    return SHIFT if family == "zimage" else math.exp(model.compute_empirical_mu((SIZE // 16) ** 2, steps))


@torch.no_grad()
def sample_source(dit, text_model, tokenizer, vae, scenes, seeds: list[int], plan: SourcePlan, device,
                  family: str = "zimage") -> np.ndarray:
    """The source's images for (scene, seed) pairs, through model.generate as sample.py --latent runs it."""
    ids = tokenize(tokenizer, sorted({s.caption for s in scenes} | {""}), family)
    images = []
    for i in range(0, len(scenes), 64):
        batch = scenes[i:i + 64]
        cap, mask = encode(text_model, [ids[s.caption] for s in batch], tokenizer.pad_token_id, device, family)
        neg, neg_mask = encode(text_model, [ids[""]] * len(batch), tokenizer.pad_token_id, device, family)
        out = model.generate(dit, cap, mask, seeds[i:i + 64], SIZE, SIZE, plan.sample_steps,
                             sampler_shift(family, plan.sample_steps), plan.cfg, neg, neg_mask, vae=vae)
        images.append(model.to_uint8(out))
    return np.concatenate(images)


def eval_jobs(plan: SourcePlan) -> tuple[list, list[int]]:
    """The GenEval protocol's (scene, seed) pairs, seed-major: seeds 0 .. eval_seeds - 1 of every distinct prompt."""
    scenes = eval_scenes(plan.eval_prompts)
    return [s for _ in range(plan.eval_seeds) for s in scenes], [k for k in range(plan.eval_seeds) for _ in scenes]


# ----------------------------------------------------------------------------------------------------------------
# The shipped files: write, check, evaluate
# ----------------------------------------------------------------------------------------------------------------


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def check_source(root: Path = SOURCE) -> dict:
    """The shipped source's manifest, after checking every file it lists against its sha256."""
    manifest_file = root / "manifest.json"
    if not manifest_file.exists():
        raise SystemExit(f"{root} holds no trained toy source (no manifest.json): restore it from git "
                         f"(git checkout -- bench/{root.name}) or train it with python bench/shapes.py --train-source"
                         f"{' --family flux2' if root.name.endswith('flux2') else ''}")
    manifest = json.loads(manifest_file.read_text())
    found = file_hashes(root)
    changed = [name for name, digest in manifest["files"].items() if found.get(name) != digest]
    if changed:
        raise SystemExit(f"{root}: {len(changed)} files differ from its manifest (first: {changed[0]}): restore them "
                         f"from git (git checkout -- bench/{root.name}) or retrain with --train-source")
    return manifest


def score_source(root: Path, plan: SourcePlan, device, log_file: Path | None = None) -> dict:
    """ShapeEval of a source repo through the real scripts' loaders (sample.py --latent): the GenEval protocol."""
    scenes, seeds = eval_jobs(plan)
    prompts = sorted({s.caption for s in scenes}, key=[s.caption for s in scenes].index)
    work = Path(log_file).parent if log_file else root.parent
    prompts_file = work / f".{root.name}-eval-prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    folder = work / f".{root.name}-eval"
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "sample.py"), "--latent", str(root), "--prompts", str(prompts_file), "--res",
           str(SIZE), "--out", str(folder), "--device", str(device), "--dtype", "fp32", "--batch-size", "32", "--seed",
           "0", "--num-images", str(plan.eval_seeds), "--latent-steps", str(plan.sample_steps), "--latent-cfg",
           str(plan.cfg)]
    with open(log_file or "/dev/null", "a") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    from PIL import Image
    images = [np.asarray(Image.open(folder / f"{prompts.index(s.caption):03d}_s{k}_latent.png").convert("RGB"))
              for s, k in zip(scenes, seeds)]
    shutil.rmtree(folder)
    prompts_file.unlink()
    return shapeworld.score(images, scenes)


def vae_score(vae: model.FluxVAE, plan: SourcePlan, device) -> dict:
    scenes = eval_scenes(plan.eval_prompts)
    with torch.no_grad():
        recon = model.to_uint8(vae.decode(vae.encode(render(scenes).to(device))))
    return shapeworld.score(list(recon), scenes)


def commit(*written: Path) -> str:
    """HEAD, marked if the tree differs from it anywhere but in the folders being written."""
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    inside = [p.resolve() for p in written if p.resolve().is_relative_to(ROOT)]
    changed = run("status", "--porcelain", "--", ".", *(f":(exclude){p.relative_to(ROOT)}" for p in inside))
    return run("rev-parse", "HEAD") + (" (with uncommitted changes)" if changed else "")


VAE_CONFIG_JSON = {"zimage": {"_class_name": "AutoencoderKL", "use_quant_conv": False, "use_post_quant_conv": False},
                   "flux2": {"_class_name": "AutoencoderKLFlux2", "use_quant_conv": True, "use_post_quant_conv": True,
                             "mid_block_add_attention": True, "act_fn": "silu"}}
SCHEDULER_JSON = {"zimage": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                             "shift": SHIFT, "use_dynamic_shifting": False},
                  "flux2": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                            "time_shift_type": "exponential"}}
PIPELINE_JSON = {"zimage": {"_class_name": "ZImagePipeline"},
                 "flux2": {"_class_name": "Flux2KleinPipeline", "is_distilled": False}}


def train_source(plan: SourcePlan, work: Path, device, seed: int = 0, target: Path = SOURCE,
                 family: str = "zimage") -> dict:
    """Train the toy source (resuming from work/), write it to `target` in its family's published layout, bf16, with
    its manifest. Returns the manifest."""
    start = time.time()
    work.mkdir(parents=True, exist_ok=True)
    vae_file = work / "vae"
    if not (vae_file / "config.json").exists():
        vae = train_vae(plan, seed, device, family)
        write_component(vae_file, vae, {**VAE_CONFIG_JSON[family], **asdict(vae.cfg)},
                        "diffusion_pytorch_model.safetensors")
    vae = model.load_vae(vae_file, device=device)  # bf16-stored, as shipped: the DiT learns the shipped latents
    log(f"VAE reconstructions: ShapeEval {vae_score(vae, plan, device)['overall']:.3f}")
    jobs = eval_jobs(plan)

    def evaluate(dit, text_model, tokenizer):
        images = sample_source(dit, text_model, tokenizer, vae, *jobs, plan, device, family)
        return shapeworld.score(list(images), jobs[0])

    trained = train_dit(plan, vae, work, seed, device, evaluate, family)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    trained["tokenizer"].save_pretrained(tmp / "tokenizer")
    text_full = trained["text_full"]
    text_full.model.load_state_dict(trained["text"].state_dict(), strict=False)  # the layers it uses are trained
    text_full.to(torch.bfloat16).save_pretrained(tmp / "text_encoder")
    shutil.copytree(vae_file, tmp / "vae")
    write_component(tmp / "transformer", trained["dit"], dit_config_json(trained["dit"].cfg),
                    "diffusion_pytorch_model.safetensors")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_JSON[family], indent=2))
    (tmp / "model_index.json").write_text(json.dumps({**PIPELINE_JSON[family], "toy": "bench/shapes.py"}))
    log("scoring the written source through sample.py --latent")
    score, recon = score_source(tmp, plan, device, work / "eval.log"), vae_score(model.load_vae(tmp), plan, "cpu")
    manifest = {"command": " ".join(["python", *sys.argv]), "commit": commit(target, tmp), "plan": asdict(plan),
                "seed": seed, "device": str(device),
                "hours_since_start": (time.time() - start) / 3600,  # of this run: a resumed source took longer
                "shapeeval": {"overall": score["overall"], "per_task": score["per_task"],
                              "protocol": f"{len(eval_scenes(plan.eval_prompts))} distinct prompts x "
                                          f"{plan.eval_seeds} seeds, {plan.sample_steps} steps, CFG {plan.cfg}, "
                                          f"shift {sampler_shift(family, plan.sample_steps)}"},
                "vae_reconstructions": {"overall": recon["overall"], "per_task": recon["per_task"]},
                "curve": trained["history"] + [{"step": plan.steps, "shapeeval": score["overall"]}],
                "files": file_hashes(tmp)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log(f"wrote {target}: ShapeEval {score['overall']:.3f}, VAE reconstructions {recon['overall']:.3f}")
    return manifest
