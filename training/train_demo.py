"""Train LatentRT's built-in demo model on procedural scenes (latentrt.scenes), on the CPU, resumably.

Stages (each resumes from its checkpoint under --work and is skipped once finished; a finished stage
trains on when its budget is raised, e.g. a larger --unet-minutes):
  1. vae     AutoencoderKL, f = 8 (64x64x3 -> 8x8x4), MSE + a small KL term (Rombach et al. 2022, LDM), plus two
             latent regularisers: whitening (the four channels uncorrelated and equal in variance; without it
             the latent was ~rank 1 per cell and red/yellow, blue/purple were a UNet error apart) and a linear
             colour probe (each cell's 8x8 average colour must be a linear function of its latent).
  2. latents encode --scenes procedural scenes once (posterior means) and fix the VAE scaling factor = 1 / std.
  3. unet    UNet2DConditionModel + CLIPTextModel trained jointly (the text tower starts random and only ever
             sees the caption grammar; the tokenizer is the real CLIP BPE), epsilon prediction on the SD noise
             schedule (scaled_linear 0.00085..0.012, 1000 steps), 10% caption dropout for classifier-free
             guidance, EMA weights; --min-snr G: min-SNR-G loss weights (Hang et al. 2023; default 0, the plain
             epsilon loss); --x0-weight K also weights high-noise errors by min(1/snr, K) (x0-space loss,
             truncated-SNR weighting, Salimans & Ho 2022);
             --terminal-share S trains a share S of each batch at t >= 900 on a pure-noise input (what the
             sampler's first step sees; the SD schedule's non-zero terminal SNR otherwise leaks the object's
             place into x_T and the UNet learns position from the noise, not the text), errors weighted in x0
             space up to --terminal-weight.
  4. teacher sample (noise, prompt) -> x0 pairs with the trained model: 20-step DDIM with CFG.
  5. turbo   the few-step student: knowledge distillation in the sense of Luhman & Luhman 2021 (arXiv:2101.02388):
             from the teacher's own noise z, the student's x0 at the trailing-schedule timesteps (999, 749,
             499, 249) regresses onto the teacher's 20-step CFG sample. At t = 999 the input is sqrt(1 - a) z,
             what 1-step Euler (trailing) feeds the UNet, so that sampler returns exactly the trained x0; later
             timesteps see the DDIM-consistent point sqrt(a) x0 + sqrt(1 - a) z. Guidance is baked in (the
             student runs without CFG).
  6. save    diffusers StableDiffusionPipeline folders `demo` (DDIM, leading) and `demo-turbo` (Euler, trailing),
             fp16 safetensors, CLIP tokenizer files, plus RESULTS.json with seed, command, wall times and losses.

    python training/train_demo.py --seed 0 --minutes 60 --work /tmp/demo-train --out reference/demo_weights
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from latentrt import scenes

LATENT = 8  # latent side (64 px / f = 8)
GUIDANCE = 4.0
TEACHER_STEPS = 20
TURBO_TIMESTEPS = (999, 749, 499, 249)
SHARES = {"vae": 16 / 60, "unet": 33 / 60, "teacher": 4 / 60, "turbo": 7 / 60, "decoder": 0.5}  # of --minutes


def vae_config() -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=1.0)


def text_config() -> dict[str, Any]:
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)


def unet_config() -> dict[str, Any]:
    return dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), norm_num_groups=16, attention_head_dim=8, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def schedule_config() -> dict[str, Any]:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def stage_minutes(args: argparse.Namespace, stage: str) -> float:
    """A stage's wall-clock budget: --<stage>-minutes when given, else its share of --minutes."""
    given = getattr(args, f"{stage}_minutes")
    return float(given) if given is not None else args.minutes * SHARES[stage]


def log(work: Path, text: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    with open(work / "train.log", "a") as f:
        f.write(line + "\n")


def save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any] | None:
    return torch.load(path, weights_only=False) if path.is_file() else None


class Stage:
    """A time-budgeted, resumable training loop: checkpoint every `every` seconds and at the end."""

    def __init__(self, work: Path, name: str, minutes: float, every: float = 120.0):
        self.work, self.name, self.path = work, name, work / f"{name}.pt"
        self.budget, self.every = minutes * 60.0, every
        self.state = load_state(self.path) or {"step": 0, "seconds": 0.0, "losses": [], "done": False}

    @property
    def done(self) -> bool:
        """Finished, and not given a larger budget since (a finished stage resumes when its budget grows)."""
        return bool(self.state["done"]) and self.state["seconds"] >= self.budget - 1.0

    def run(self, step_fn: Any, snapshot: Any) -> None:
        start = last = time.perf_counter()
        base = self.state["seconds"]
        while base + (time.perf_counter() - start) < self.budget:
            loss = step_fn(self.state["step"])
            self.state["step"] += 1
            self.state["losses"].append(float(loss))
            if self.state["step"] % 50 == 0:
                recent = np.mean(self.state["losses"][-50:])
                log(self.work, f"{self.name} step {self.state['step']} loss {recent:.5f} "
                               f"({base + time.perf_counter() - start:.0f} s)")
            if time.perf_counter() - last > self.every:
                self.state["seconds"] = base + time.perf_counter() - start
                save_state(self.path, {**self.state, **snapshot()})
                last = time.perf_counter()
        self.state["seconds"] = base + time.perf_counter() - start
        self.state["done"] = True
        save_state(self.path, {**self.state, **snapshot()})

    def summary(self) -> dict[str, Any]:
        losses = self.state["losses"]
        return {"steps": self.state["step"], "seconds": round(self.state["seconds"], 1),
                "final_loss": float(np.mean(losses[-100:])) if losses else None}


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- 1. VAE ---------------------------------------------------------------------------------------------------

def latent_whitening_loss(z: torch.Tensor) -> torch.Tensor:
    """How far the latent channels' covariance (over every cell of the batch) is from a multiple of the identity.

    Without it the demo VAE put nearly all of its latent variance in one direction per cell (covariance
    eigenvalues 3.82 / 0.083 / 0.030 / 0.001): colours that differ only along the small directions (red vs
    yellow, blue vs purple) were a UNet error apart. Zero when the four channels are uncorrelated and equal
    in variance; the scale itself is left free (the scaling factor normalises it afterwards).
    """
    c = z.shape[1]
    flat = z.transpose(0, 1).reshape(c, -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    cov = flat @ flat.T / flat.shape[1]
    cov = cov / (torch.diagonal(cov).mean() + 1e-8)
    return ((cov - torch.eye(c)) ** 2).sum() / c


def train_vae(args: argparse.Namespace, work: Path) -> tuple[Any, Stage]:
    from diffusers import AutoencoderKL

    stage = Stage(work, "vae", stage_minutes(args, "vae"))
    torch.manual_seed(args.seed)
    vae: Any = AutoencoderKL(**vae_config())
    # linear colour probe: the latent's cells must give the 8x8 average colour linearly (training aid, not saved
    # with the VAE), so colour lies along large latent directions, as in SD's own latents
    probe = torch.nn.Conv2d(4, 3, 1)
    params = list(vae.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    if "model" in stage.state:
        vae.load_state_dict(stage.state["model"])
        if "probe" in stage.state:
            probe.load_state_dict(stage.state["probe"])
            opt.load_state_dict(stage.state["opt"])
    if not stage.done:
        vae.train()

        def step(i: int) -> float:
            rng = np.random.default_rng([args.seed, 1, i])
            x = torch.from_numpy(scenes.batch([scenes.sample_scene(rng) for _ in range(args.batch_vae)]))
            post = vae.encode(x).latent_dist
            z = post.sample(generator=make_generator(args.seed * 7919 + i))
            rec = vae.decode(z).sample
            kl = post.kl().mean() / (4 * LATENT * LATENT)
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
            if args.vae_whiten > 0:
                loss = loss + args.vae_whiten * latent_whitening_loss(post.mean)
            if args.vae_probe > 0:
                loss = loss + args.vae_probe * F.mse_loss(probe(post.mean), F.avg_pool2d(x, 64 // LATENT))
            for g in opt.param_groups:
                g["lr"] = args.vae_lr * min(1.0, (i + 1) / 100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss.item()

        stage.run(step, lambda: {"model": vae.state_dict(), "probe": probe.state_dict(), "opt": opt.state_dict()})
    return vae.eval(), stage


# ---- 1b. decoder fine-tuning (frozen encoder: the latent space, and so the UNet, stay valid) --------------------

def train_decoder(args: argparse.Namespace, work: Path, vae: Any) -> tuple[Any, Stage]:
    """Fine-tune the VAE decoder alone on the frozen encoder's latents (as SD's ft-MSE decoder was).

    The encoder, and so every cached latent and the UNet trained on them, is unchanged; the decoder sees
    the posterior mean plus a little noise (0.1 of the latent std) so that it tolerates a UNet's errors.
    This stage may run in a second process while the UNet trains (--only decoder).
    """
    stage = Stage(work, "decoder", stage_minutes(args, "decoder"))
    parts = [vae.post_quant_conv, vae.decoder]
    params = [p for m in parts for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    if "decoder" in stage.state:
        vae.load_state_dict(stage.state["decoder"])
        opt.load_state_dict(stage.state["opt"])
        for g in opt.param_groups:  # a continuation may lower the rate
            g["lr"] = args.decoder_lr
    if not stage.done:
        vae.decoder.train()

        def step(i: int) -> float:
            rng = np.random.default_rng([args.seed, 2, i])
            x = torch.from_numpy(scenes.batch([scenes.sample_scene(rng) for _ in range(args.batch_vae)]))
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
                z = z + 0.1 * z.std() * torch.randn(z.shape, generator=make_generator(args.seed * 6151 + i))
            rec = vae.decode(z).sample
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        stage.run(step, lambda: {"decoder": vae.state_dict(), "opt": opt.state_dict()})
    return vae.eval(), stage


# ---- 2. latents -----------------------------------------------------------------------------------------------

def encode_latents(args: argparse.Namespace, work: Path, vae: Any) -> dict[str, Any]:
    path = work / "latents.pt"
    if (cached := load_state(path)) is not None:
        return cached
    t0 = time.perf_counter()
    scene_list = scenes.scenes(args.seed + 1000, args.scenes)
    captions = scenes.all_captions()
    index = {c: i for i, c in enumerate(captions)}
    chunks = []
    with torch.no_grad():
        for k in range(0, len(scene_list), 256):
            x = torch.from_numpy(scenes.batch(scene_list[k: k + 256]))
            chunks.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(chunks)
    scale = float(1.0 / latents.std())
    data = {"latents": latents, "caption": torch.tensor([index[s.caption] for s in scene_list]),
            "captions": captions, "scaling_factor": scale, "seconds": time.perf_counter() - t0}
    save_state(path, data)
    log(work, f"encoded {len(scene_list)} scenes in {data['seconds']:.0f} s; scaling factor {scale:.5f}")
    return data


# ---- 3. UNet + text encoder ---------------------------------------------------------------------------------

def tokenizer(work: Path) -> Any:
    from transformers import CLIPTokenizer

    from latentrt.reference.tokenizers import save_clip_tokenizer

    folder = work / "tokenizer"
    if not (folder / "vocab.json").is_file():
        save_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def token_ids(tok: Any, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train_unet(args: argparse.Namespace, work: Path, data: dict[str, Any], tok: Any) -> tuple[Any, Any, Stage]:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    stage = Stage(work, "unet", stage_minutes(args, "unet"))
    torch.manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**unet_config())
    text = CLIPTextModel(CLIPTextConfig(**text_config()))
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    if "unet" in stage.state:
        for m, key in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            m.load_state_dict(stage.state[key])
        opt.load_state_dict(stage.state["opt"])
    sched: Any = DDPMScheduler(**schedule_config())
    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    ids = token_ids(tok, data["captions"] + [""])
    empty = len(data["captions"])
    latents = data["latents"] * data["scaling_factor"]
    n = latents.shape[0]
    if not stage.done:
        unet.train()
        text.train()

        def step(i: int) -> float:
            g = make_generator(args.seed * 104729 + i)
            pick = torch.randint(0, n, (args.batch,), generator=g)
            x0 = latents[pick]
            cap = data["caption"][pick].clone()
            cap[torch.rand(args.batch, generator=g) < 0.1] = empty
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (args.batch,), generator=g)
            k = int(round(args.terminal_share * args.batch))
            if k:  # terminal samples: t near T and an input that is pure noise, as the sampler's first step sees
                t[:k] = torch.randint(args.terminal_from, 1000, (k,), generator=g)
            xt = sched.add_noise(x0, noise, t)
            target = noise
            if k:
                a = acp[t[:k]].view(-1, 1, 1, 1)
                xt[:k] = torch.randn(xt[:k].shape, generator=g)
                target = noise.clone()
                target[:k] = (xt[:k] - a.sqrt() * x0[:k]) / (1 - a).sqrt()  # the epsilon that x_t = pure noise implies
            ctx = text(ids[cap]).last_hidden_state
            eps = unet(xt, t, encoder_hidden_states=ctx).sample
            w = torch.ones(args.batch)
            if args.min_snr > 0:  # min-SNR-gamma for epsilon prediction (down-weights the low-noise steps)
                w = torch.clamp(snr[t], max=args.min_snr) / snr[t]
            if args.x0_weight > 0:  # truncated-SNR x0 weighting at high noise (Salimans & Ho 2022): 1 / snr
                w = torch.maximum(w, torch.clamp(1.0 / snr[t], max=args.x0_weight))
            if k:  # the terminal samples' errors in x0 space (eps error * sqrt(1/snr)), capped
                w[:k] = torch.clamp(1.0 / snr[t[:k]], max=args.terminal_weight)
            loss = (w * ((eps - target) ** 2).mean(dim=(1, 2, 3))).mean()
            for grp in opt.param_groups:
                grp["lr"] = args.lr * min(1.0, (i + 1) / 200)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(0.999, (1 + i) / (10 + i))
            ema_update(ema_unet, unet, decay)
            ema_update(ema_text, text, decay)
            return loss.item()

        stage.run(step, lambda: {"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                                 "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict()})
    return ema_unet.eval(), ema_text.eval(), stage


# ---- 4. teacher samples ----------------------------------------------------------------------------------------

@torch.no_grad()
def ddim_cfg(unet: Any, ctx: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int,
             guidance: float) -> torch.Tensor:
    """DDIM (eta 0, leading spacing, steps_offset 1) with classifier-free guidance, via diffusers' DDIMScheduler."""
    from diffusers import DDIMScheduler

    sched: Any = DDIMScheduler(**schedule_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    x = noise.clone()
    both = torch.cat([uncond.expand_as(ctx), ctx])
    for t in sched.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


def teacher_pairs(args: argparse.Namespace, work: Path, unet: Any, text: Any, tok: Any,
                  captions: list[str]) -> dict[str, Any]:
    path = work / "teacher.pt"
    state = load_state(path) or {"noise": [], "caption": [], "x0": [], "seconds": 0.0}
    budget = stage_minutes(args, "teacher") * 60.0
    t0 = time.perf_counter()
    base = state["seconds"]
    with torch.no_grad():
        ctx_all = text(token_ids(tok, captions + [""])).last_hidden_state
    k = len(state["noise"])
    while base + time.perf_counter() - t0 < budget and k * 64 < args.teacher_pairs:
        g = make_generator(args.seed * 15485863 + k)
        cap = torch.randint(0, len(captions), (64,), generator=g)
        noise = torch.randn((64, 4, LATENT, LATENT), generator=g)
        x0 = ddim_cfg(unet, ctx_all[cap], ctx_all[-1:], noise, TEACHER_STEPS, GUIDANCE)
        state["noise"].append(noise)
        state["caption"].append(cap)
        state["x0"].append(x0)
        k += 1
        state["seconds"] = base + time.perf_counter() - t0
        save_state(path, state)
        log(work, f"teacher pairs {k * 64} ({state['seconds']:.0f} s)")
    return state


# ---- 5. Turbo student ------------------------------------------------------------------------------------------

def train_turbo(args: argparse.Namespace, work: Path, teacher: Any, text: Any, tok: Any, captions: list[str],
                pairs: dict[str, Any]) -> tuple[Any, Stage]:
    from diffusers import DDPMScheduler

    stage = Stage(work, "turbo", stage_minutes(args, "turbo"))
    student = copy.deepcopy(teacher)
    ema = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=args.turbo_lr, weight_decay=0.0)
    if "unet" in stage.state:
        student.load_state_dict(stage.state["unet"])
        ema.load_state_dict(stage.state["ema_unet"])
        opt.load_state_dict(stage.state["opt"])
    acp = DDPMScheduler(**schedule_config()).alphas_cumprod
    noise_all, cap_all, x0_all = (torch.cat(pairs[k]) for k in ("noise", "caption", "x0"))
    with torch.no_grad():
        ctx_all = text(token_ids(tok, captions)).last_hidden_state
    n = noise_all.shape[0]
    if not stage.done:
        student.train()
        ts = torch.tensor(TURBO_TIMESTEPS)

        def step(i: int) -> float:
            g = make_generator(args.seed * 32452843 + i)
            pick = torch.randint(0, n, (args.batch,), generator=g)
            z, x0 = noise_all[pick], x0_all[pick]
            # --turbo-one-step-share of the batch at t = 999 (the 1-step sampler's only step), the rest uniform
            first = torch.rand(args.batch, generator=g) < args.turbo_one_step_share
            t = torch.where(first, ts[0], ts[1:][torch.randint(0, len(ts) - 1, (args.batch,), generator=g)])
            a = acp[t].view(-1, 1, 1, 1)
            # at t = 999 exactly what 1-step Euler (trailing) feeds the UNet: sqrt(1 - a) z, no x0 in it
            xt = torch.where(first.view(-1, 1, 1, 1), (1 - a).sqrt() * z, a.sqrt() * x0 + (1 - a).sqrt() * z)
            eps = student(xt, t, encoder_hidden_states=ctx_all[cap_all[pick]]).sample
            pred = (xt - (1 - a).sqrt() * eps) / a.sqrt()
            loss = F.mse_loss(pred, x0)
            for grp in opt.param_groups:
                grp["lr"] = args.turbo_lr * min(1.0, (i + 1) / 100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            ema_update(ema, student, min(0.995, (1 + i) / (10 + i)))
            return loss.item()

        stage.run(step, lambda: {"unet": student.state_dict(), "ema_unet": ema.state_dict(),
                                 "opt": opt.state_dict()})
    return ema.eval(), stage


# ---- 6. save ---------------------------------------------------------------------------------------------------

def save_folder(folder: Path, vae: Any, text: Any, unet: Any, tok: Any, scheduler: Any) -> None:
    from diffusers import StableDiffusionPipeline

    none: Any = None  # no safety checker or feature extractor (diffusers' annotations do not say Optional)
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text).half(),
                                   tokenizer=tok, unet=copy.deepcopy(unet).half(), scheduler=scheduler,
                                   safety_checker=none, feature_extractor=none, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def schedulers() -> tuple[Any, Any]:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    multi = DDIMScheduler(**schedule_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="leading", prediction_type="epsilon")
    turbo = EulerDiscreteScheduler(**schedule_config(), timestep_spacing="trailing", prediction_type="epsilon",
                                   steps_offset=1)
    return multi, turbo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=60.0, help="total training budget (split between stages)")
    p.add_argument("--work", type=Path, default=Path("demo-train"), help="checkpoints (resume from here)")
    p.add_argument("--out", type=Path, default=Path("reference/demo_weights"), help="where demo/ and demo-turbo/ go")
    for stage in SHARES:
        p.add_argument(f"--{stage}-minutes", type=float, help=f"{stage} budget (default: its share of --minutes)")
    p.add_argument("--scenes", type=int, default=4000)
    p.add_argument("--teacher-pairs", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch-vae", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-whiten", type=float, default=0.05,
                   help="VAE: weight of the latent whitening loss (channels uncorrelated, equal variance)")
    p.add_argument("--vae-probe", type=float, default=1.0,
                   help="VAE: weight of the linear colour probe loss (8x8 average colour from the latent)")
    p.add_argument("--turbo-one-step-share", type=float, default=0.5,
                   help="Turbo student: share of samples at t = 999 (0.25: the four timesteps uniformly)")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--turbo-lr", type=float, default=1e-4)
    p.add_argument("--x0-weight", type=float, default=0.0,
                   help="UNet loss: weight eps errors by min(1/snr, this) at high noise (0: min-SNR-5 only)")
    p.add_argument("--min-snr", type=float, default=0.0, help="UNet: min-SNR-gamma loss weights (0: plain eps loss)")
    p.add_argument("--terminal-share", type=float, default=0.25,
                   help="UNet: this share of each batch is trained at t >= --terminal-from on a pure-noise input "
                        "(the leaked signal that the SD schedule leaves at T is absent when sampling)")
    p.add_argument("--terminal-from", type=int, default=900)
    p.add_argument("--terminal-weight", type=float, default=150.0, help="cap of the terminal samples' x0 weight 1/snr")
    p.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a busy machine: OpenMP spin-waits)")
    p.add_argument("--stop-after", choices=("vae", "latents", "unet", "teacher", "turbo"), help="stop after a stage")
    p.add_argument("--only", choices=("decoder",), help="run only this stage (in parallel with the main run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log(work, "command: " + shlex.join([sys.executable, *sys.argv]))
    wall = time.perf_counter()
    vae, vae_stage = train_vae(args, work)
    if args.stop_after == "vae":
        return 0
    if args.only == "decoder":
        train_decoder(args, work, vae)
        return 0
    data = encode_latents(args, work, vae)
    vae.config.scaling_factor = data["scaling_factor"]
    if args.stop_after == "latents":
        return 0
    tok = tokenizer(work)
    unet, text, unet_stage = train_unet(args, work, data, tok)
    if args.stop_after == "unet":
        return 0
    pairs = teacher_pairs(args, work, unet, text, tok, data["captions"])
    if args.stop_after == "teacher":
        return 0
    student, turbo_stage = train_turbo(args, work, unet, text, tok, data["captions"], pairs)
    if args.stop_after == "turbo":
        return 0
    decoder_stage = None
    if (work / "decoder.pt").is_file():  # the decoder fine-tuned in parallel (--only decoder): its finished weights
        vae, decoder_stage = train_decoder(args, work, vae)
    vae.register_to_config(scaling_factor=data["scaling_factor"])
    multi, turbo = schedulers()
    save_folder(args.out / "demo", vae, text, unet, tok, multi)
    save_folder(args.out / "demo-turbo", vae, text, student, tok, turbo)
    results = {
        "seed": args.seed, "command": shlex.join(["python", "training/train_demo.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__, "threads": args.threads,
        "stages": {"vae": vae_stage.summary(), "unet": unet_stage.summary(), "turbo": turbo_stage.summary(),
                   "latents": {"scenes": args.scenes, "seconds": round(float(data["seconds"]), 1),
                               "scaling_factor": data["scaling_factor"]},
                   "teacher": {"pairs": sum(len(x) for x in pairs["noise"]), "seconds": round(pairs["seconds"], 1),
                               "sampler": f"DDIM {TEACHER_STEPS} steps, CFG {GUIDANCE}"}},
        "wall_seconds_this_run": round(time.perf_counter() - wall, 1),
    }
    if decoder_stage is not None:
        results["stages"]["decoder"] = decoder_stage.summary()
    results["training_seconds"] = round(sum(s.get("seconds", 0.0) for s in results["stages"].values()), 1)
    (args.out / "RESULTS.json").write_text(json.dumps(results, indent=2) + "\n")
    log(work, json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

