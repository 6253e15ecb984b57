"""Train the ShapesWorld text-to-image model (VAE, then UNet) and its shape judge on a CPU.

Every stage is seeded, logs losses to CSV, writes checkpoints every few minutes and resumes from
the newest one, so a run killed at any point continues where it stopped:

    nohup python scripts/train_shapesworld.py all > runs/shapesworld/train.log 2>&1 &

Stages (``all`` runs the missing ones in order):
    vae      AutoencoderKL 64x64x3 -> 8x8x4, on freshly rendered images every step
    data     render the UNet training set, encode it with the VAE, encode captions with MiniLM
    unet     UNet2DConditionModel on the cached latents and token states (EMA weights kept)
    judge    the shape classifier of the judge, on fresh renders with degradations
    export   write the shipped fp16 safetensors weights into safeguard/models/weights/
See safeguard/models/weights/shapesworld/MODEL_CARD.md for what a full run gives.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safeguard.eval.color_rule import read_color  # noqa: E402
from safeguard.models.shapesworld import architecture as arch  # noqa: E402
from safeguard.models.shapesworld.captions import caption  # noqa: E402
from safeguard.models.shapesworld.world import render_many, sample_specs  # noqa: E402

RUN = ROOT / "runs" / "shapesworld"
WEIGHTS = ROOT / "safeguard" / "models" / "weights" / "shapesworld"


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class Checkpoint:
    """Resumable training state: model (+EMA) weights in safetensors, optimizer via weights_only."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: torch.nn.Module | None = None):
        tmp = self.folder / "tmp"
        tmp.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        for f in tmp.iterdir():
            f.replace(self.folder / f.name)
        tmp.rmdir()

    def load(self, model, opt, ema=None) -> int:
        state = self.folder / "state.json"
        if not state.exists():
            return 0
        model.load_state_dict(load_file(self.folder / "model.safetensors"))
        if ema is not None and (self.folder / "ema.safetensors").exists():
            ema.load_state_dict(load_file(self.folder / "ema.safetensors"))
        opt.load_state_dict(torch.load(self.folder / "optimizer.pt", weights_only=True))
        return int(json.loads(state.read_text())["step"])


def log_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


# ---------------------------------------------------------------- VAE
def vae_weights(imgs: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight: object pixels (and their edges) count 5x the background."""
    bg = imgs[:, :, :1, :1]  # top-left pixel is background in every render of this world
    obj = ((imgs - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()
    obj = F.max_pool2d(obj, 3, stride=1, padding=1)
    return 1.0 + 4.0 * obj


@torch.no_grad()
def vae_color_accuracy(vae, n: int = 1024, seed: int = 999_999) -> float:
    specs = sample_specs(n, seed)
    imgs = to_tensor(render_many(specs))
    ok = 0
    for i in range(0, n, 128):
        rec = vae.decode(vae.encode(imgs[i : i + 128]).latent_dist.mode()).sample
        for img, spec in zip(to_uint8(rec), specs[i : i + 128]):
            r = read_color(img)
            ok += r.color == spec.color and r.background == spec.background
    return ok / n


def train_vae(args) -> None:
    torch.manual_seed(args.seed)
    vae = arch.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ck = Checkpoint(RUN / "vae")
    step = ck.load(vae, opt)
    rng = np.random.default_rng(args.seed + step)
    vae.train()
    last_save = time.time()
    bar = tqdm(range(step, args.vae_steps), initial=step, total=args.vae_steps, desc="vae", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 100)
        specs = [s for s in sample_specs(args.vae_batch, int(rng.integers(1 << 62)))]
        x = to_tensor(render_many(specs))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        w = vae_weights(x)
        mse = (w * (rec - x) ** 2).mean()
        l1 = (w * (rec - x).abs()).mean()
        kl = post.kl().mean()
        loss = mse + 0.5 * l1 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log_row(
                RUN / "vae_loss.csv",
                {"step": step, "loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "kl": kl.item()},
            )
        if time.time() - last_save > args.save_every_s or step == args.vae_steps - 1:
            ck.save(step + 1, vae, opt)
            last_save = time.time()
            if (step + 1) % 400 < 60 or step == args.vae_steps - 1:
                vae.eval()
                acc = vae_color_accuracy(vae, 512)
                vae.train()
                log_row(RUN / "vae_eval.csv", {"step": step + 1, "color_and_background_acc": acc})
                tqdm.write(f"vae step {step + 1}: colour+background accuracy of reconstructions {acc:.3f}")
    vae.eval()
    acc = vae_color_accuracy(vae, 1024)
    log_row(RUN / "vae_eval.csv", {"step": args.vae_steps, "color_and_background_acc": acc})
    print(f"VAE done: colour+background accuracy on 1024 held-out reconstructions = {acc:.4f}", flush=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, RUN / "vae_final.safetensors")


# ---------------------------------------------------------------- data for the UNet
@torch.no_grad()
def build_data(args) -> None:
    from safeguard.models.minilm import load_minilm

    vae = arch.build_vae()
    vae.load_state_dict(load_file(RUN / "vae_final.safetensors"))
    vae.eval()
    specs = sample_specs(args.n_images, args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    captions = [[caption(s, rng) for _ in range(args.captions_per_image)] for s in specs]
    unique = sorted({c for cs in captions for c in cs} | {""})
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([[index[c] for c in cs] for cs in captions], dtype=torch.int32)
    tok, enc = load_minilm()
    states = []
    for i in tqdm(range(0, len(unique), 256), desc="encode captions"):
        t = tok(
            unique[i : i + 256],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        states.append(enc(t.input_ids, attention_mask=t.attention_mask)[0].half())
    states = torch.cat(states)
    lat_mean, lat_std = [], []
    for i in tqdm(range(0, len(specs), 250), desc="encode images"):
        post = vae.encode(to_tensor(render_many(specs[i : i + 250]))).latent_dist
        lat_mean.append(post.mean)
        lat_std.append(post.std)
    lat_mean, lat_std = torch.cat(lat_mean).contiguous(), torch.cat(lat_std).contiguous()
    scaling = float(1.0 / lat_mean.std())
    save_file(
        {"latent_mean": lat_mean, "latent_std": lat_std, "caption_index": cap_idx, "text_states": states},
        RUN / "unet_data.safetensors",
        metadata={"scaling_factor": str(scaling), "empty_caption": str(index[""]), "n_captions": str(len(unique))},
    )
    (RUN / "captions.json").write_text(json.dumps(unique))
    print(f"data: {len(specs)} images, {len(unique)} unique captions, latent scaling factor {scaling:.4f}", flush=True)


# ---------------------------------------------------------------- UNet
def train_unet(args) -> None:
    from diffusers import DDPMScheduler
    from safetensors import safe_open

    torch.manual_seed(args.seed)
    with safe_open(str(RUN / "unet_data.safetensors"), "pt") as f:
        meta = f.metadata()
    data = load_file(RUN / "unet_data.safetensors")
    scaling, empty = float(meta["scaling_factor"]), int(meta["empty_caption"])
    mean, std, cap_idx = data["latent_mean"], data["latent_std"], data["caption_index"].long()
    states = data["text_states"].float()
    sched = DDPMScheduler(**arch.SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    unet = arch.build_unet()
    ema = arch.build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    ck = Checkpoint(RUN / "unet")
    step = ck.load(unet, opt, ema)
    g = torch.Generator().manual_seed(args.seed + step)
    n = mean.shape[0]
    unet.train()
    last_save = time.time()
    bar = tqdm(range(step, args.unet_steps), initial=step, total=args.unet_steps, desc="unet", mininterval=10)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.unet_steps, args.unet_lr, 200)
        idx = torch.randint(0, n, (args.unet_batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        which = torch.randint(0, cap_idx.shape[1], (args.unet_batch,), generator=g)
        ci = cap_idx[idx, which]
        drop = torch.rand(args.unet_batch, generator=g) < args.cond_dropout
        ci = torch.where(drop, torch.full_like(ci, empty), ci)
        cond = states[ci]
        t = torch.randint(0, sched.config.num_train_timesteps, (args.unet_batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        # min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction
        w = torch.clamp(snr[t], max=args.min_snr_gamma) / snr[t]
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log_row(RUN / "unet_loss.csv", {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
        if time.time() - last_save > args.save_every_s or step == args.unet_steps - 1:
            ck.save(step + 1, unet, opt, ema)
            last_save = time.time()
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, RUN / "unet_final.safetensors")
    (RUN / "unet_final.json").write_text(json.dumps({"scaling_factor": scaling, "steps": args.unet_steps}))
    print("UNet done", flush=True)


# ---------------------------------------------------------------- judge
def train_judge(args) -> None:
    from safeguard.eval.shape_classifier import ShapeClassifier, degrade

    torch.manual_seed(args.seed)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.judge_lr, weight_decay=1e-4)
    ck = Checkpoint(RUN / "judge")
    step = ck.load(model, opt)
    rng = np.random.default_rng(args.seed + 10 + step)
    g = torch.Generator().manual_seed(args.seed + 11 + step)
    from safeguard.models.shapesworld.world import SHAPES

    model.train()
    last_save = time.time()
    bar = tqdm(range(step, args.judge_steps), initial=step, total=args.judge_steps, desc="judge", mininterval=10)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.judge_steps, args.judge_lr, 100, floor=0.02)
        specs = sample_specs(args.judge_batch, int(rng.integers(1 << 62)))
        x = torch.from_numpy(render_many(specs)).permute(0, 3, 1, 2).float() / 255.0
        x = degrade(x, g)
        y = torch.tensor([SHAPES.index(s.shape) for s in specs])
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log_row(RUN / "judge_loss.csv", {"step": step, "loss": loss.item()})
        if time.time() - last_save > args.save_every_s or step == args.judge_steps - 1:
            ck.save(step + 1, model, opt)
            last_save = time.time()
    model.eval()
    specs = sample_specs(2000, 4242)
    with torch.no_grad():
        x = torch.from_numpy(render_many(specs)).permute(0, 3, 1, 2).float() / 255.0
        pred = torch.cat([model(x[i : i + 250]).argmax(1) for i in range(0, 2000, 250)])
    acc = float((pred == torch.tensor([SHAPES.index(s.shape) for s in specs])).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, RUN / "judge_final.safetensors")
    (RUN / "judge_final.json").write_text(json.dumps({"clean_accuracy_2000": acc, "steps": args.judge_steps}))
    print(f"judge done: accuracy on 2000 held-out clean renders = {acc:.4f}", flush=True)


# ---------------------------------------------------------------- export
def export(args) -> None:
    from diffusers import DPMSolverMultistepScheduler

    WEIGHTS.mkdir(parents=True, exist_ok=True)
    vae = arch.build_vae()
    vae.load_state_dict(load_file(RUN / "vae_final.safetensors"))
    vae.register_to_config(scaling_factor=json.loads((RUN / "unet_final.json").read_text())["scaling_factor"])
    vae.to(torch.float16).save_pretrained(WEIGHTS / "vae")
    unet = arch.build_unet()
    unet.load_state_dict(load_file(RUN / "unet_final.safetensors"))
    unet.to(torch.float16).save_pretrained(WEIGHTS / "unet")
    DPMSolverMultistepScheduler(**arch.SCHEDULER_CONFIG).save_pretrained(WEIGHTS / "scheduler")
    if (RUN / "judge_final.safetensors").exists():
        judge = load_file(RUN / "judge_final.safetensors")
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in judge.items()}, WEIGHTS / "judge.safetensors"
        )
    print(f"exported to {WEIGHTS}", flush=True)


def main(argv: list[str] | None = None) -> None:
    global RUN, WEIGHTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["all", "vae", "data", "unet", "judge", "export"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", type=Path, default=RUN, help="where checkpoints and logs go")
    p.add_argument("--export-dir", type=Path, default=WEIGHTS, help="where the shipped weights go")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every-s", type=float, default=180.0)
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--n-images", type=int, default=40_000)
    p.add_argument("--captions-per-image", type=int, default=4)
    p.add_argument("--unet-steps", type=int, default=10_000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--judge-steps", type=int, default=2000)
    p.add_argument("--judge-batch", type=int, default=96)
    p.add_argument("--judge-lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    RUN, WEIGHTS = args.run_dir, args.export_dir
    RUN.mkdir(parents=True, exist_ok=True)
    stages = {
        "vae": (train_vae, RUN / "vae_final.safetensors"),
        "data": (build_data, RUN / "unet_data.safetensors"),
        "unet": (train_unet, RUN / "unet_final.safetensors"),
        "judge": (train_judge, RUN / "judge_final.safetensors"),
        "export": (export, None),
    }
    todo = list(stages) if args.stage == "all" else [args.stage]
    for name in todo:
        fn, done = stages[name]
        if args.stage == "all" and done is not None and done.exists():
            print(f"stage {name}: already done ({done.name})", flush=True)
            continue
        t0 = time.time()
        fn(args)
        print(f"stage {name}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
