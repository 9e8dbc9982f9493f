"""Training speed and memory: the project's trainer against the reference LoRA loop and a full fine-tune.

In one process, with the same model shape, resolution, batch, rank and precision, times
  (a) reference: the loop of diffusers' LoRA training examples: frozen base (bf16 on CUDA, fp32 on CPU),
      fp32 LoRA via peft on the attention projections, VAE and text encoder run every step, autocast, AdamW,
      eager;
  (b) full: a full fine-tune step (the DreamBooth baseline): every UNet weight trains, fp32 master
      weights, autocast, AdamW, eager;
  (c) the project's trainer (`lora_ops.train_pti`, its defaults) through its real code path, both
      phases: inversion (token rows, gradients through the text encoder) and tuning (LoRA).
Warm-up steps (compilation included) are timed apart from the steady steps; the step time is the median.
Peak memory is torch.cuda.max_memory_allocated on CUDA ("n/a" on CPU, where the process RSS is not a
per-variant measure). `--pti-e2e` adds the wall time of a whole PTI run (the original project's
recommended settings: 1000 + 1000 steps, batch 1 x 4 accumulated, text-encoder LoRA, continued inversion).

SDXL (`--arch sdxl`, 1024 px by default; `sdxl-tiny` for a CPU run) is timed the same way: both text
encoders (penultimate states side by side, the second one's pooled projection) and the size conditioning
in every variant, the trainer's tokens in both encoders.

    .venv/bin/python benchmarks/train_speed.py --arch tiny                      # CPU, seconds
    python benchmarks/train_speed.py --arch sd15 --device cuda --batch 4 --resolution 512 --json b4.json
    python benchmarks/train_speed.py --arch sd15 --device cuda --pti-e2e --json pti.json
    python benchmarks/train_speed.py --arch sdxl --device cuda --batch 1 --json sdxl.json   # 1024 px, peak GiB
    python benchmarks/train_speed.py --arch sdxl --device cuda --batch 1 --gradient-checkpointing --json x.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_ops.tiny import make_tiny_model  # noqa: E402
from lora_ops.training.compile import resolve_compile  # noqa: E402

REFERENCE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# ---- helpers ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def summarize(name: str, times: list[float], warmup_s: float, batch: int, device, extra=None) -> dict:
    ms = statistics.median(times) * 1000
    return {
        "variant": name,
        "ms_per_step": ms,
        "samples_per_s": batch / (ms / 1000),
        "warmup_s": warmup_s,
        "steps_timed": len(times),
        "peak_gib": peak_gib(device),
        **(extra or {}),
    }


def write_images(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def load_components(model_dir: Path, device: torch.device):
    """UNet, VAE, text encoders (one, or SDXL's two), noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    encoders = [CLIPTextModel.from_pretrained(model_dir / "text_encoder").to(device)]
    if (model_dir / "text_encoder_2").is_dir():
        encoders.append(CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2").to(device))
    sched = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    return unet, vae.to(device), encoders, sched


def encode_text(encoders, ids: torch.Tensor, resolution: int):
    """(states, UNet extra kwargs): SD 1.x/2.x the last hidden states; SDXL both encoders' penultimate states
    side by side, the second one's pooled projection and the size conditioning (a full, uncropped frame)."""
    if len(encoders) == 1:
        return encoders[0](ids)[0], {}
    states, pooled = [], None
    for encoder in encoders:
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]
        states.append(out.hidden_states[-2])
    size = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=ids.device, dtype=pooled.dtype)
    added = {"text_embeds": pooled, "time_ids": size.expand(ids.shape[0], 6)}
    return torch.cat(states, dim=-1), {"added_cond_kwargs": added}


# ---- (a) and (b): the baselines, written the way diffusers' examples write them ---------------------------


def baseline_loop(kind: str, args, model_dir: Path, device: torch.device) -> dict:
    """(a) kind="reference" (peft LoRA, frozen base) or (b) kind="full" (every UNet weight trains)."""
    unet, vae, encoders, sched = load_components(model_dir, device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    base_dtype = amp or torch.float32
    vae.to(dtype=base_dtype).requires_grad_(False)
    for te in encoders:
        te.to(dtype=base_dtype).requires_grad_(False)
    if kind == "reference":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=base_dtype)
        unet.add_adapter(
            LoraConfig(
                r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=REFERENCE_TARGETS
            )
        )
        for p in unet.parameters():  # diffusers' cast_training_params: trainable LoRA in fp32
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.to(device)  # fp32 master weights, trained under autocast
        unet.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1).to(device, base_dtype)
    vocab = min(te.config.vocab_size for te in encoders)
    ids = torch.randint(0, vocab - 2, (args.batch, 77), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def step():
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            embeds, extra = encode_text(encoders, ids, args.resolution)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with autocast:
            pred = unet(noisy, t, embeds, **extra).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    name = "reference LoRA loop (a)" if kind == "reference" else "full fine-tune (b)"
    out = summarize(name, times, warmup_s, args.batch, device, {"trained_params": sum(p.numel() for p in params)})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- (c): the project's trainer ---------------------------------------------------------------------------


def pti_config(args, model_dir: Path, data: Path, out: Path, **overrides):
    from lora_ops.training.config import PTIConfig

    values = dict(
        pretrained_model_name_or_path=str(model_dir),
        instance_data_dir=str(data),
        output_dir=str(out),
        resolution=args.resolution,
        train_batch_size=args.batch,
        lora_rank=args.rank,
        placeholder_tokens="<s1>|<s2>",
        use_template="object",
        device=str(args.device),
        progress=False,
        eval_noises=0,
        save_steps=10**6,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.arch == "sdxl-tiny":
        values["bucket_reso_steps"] = 8  # bucketing is on by default for SDXL; 32 px sides step by 8
    if args.compile is not None:
        values["compile"] = args.compile
    values.update(overrides)
    return PTIConfig(**values)


def project_trainer(args, model_dir: Path, data: Path, work: Path, device: torch.device) -> list[dict]:
    """(c): train_pti with both phases; step times from the callback (called after every optimizer step)."""
    from lora_ops.training.pti import train_pti

    steps = args.warmup + args.repeats
    stamps: dict[str, list[float]] = {"inversion": [], "tuning": []}
    peaks: dict[str, float | None] = {}

    def callback(step, info):
        sync(device)
        stamps[info["phase"]].append(time.perf_counter())
        if len(stamps[info["phase"]]) == args.warmup:
            reset_peak(device)
        if len(stamps[info["phase"]]) == steps:
            peaks[info["phase"]] = peak_gib(device)

    config = pti_config(args, model_dir, data, work / "trainer", max_train_steps_ti=steps, max_train_steps_tuning=steps)
    began = time.perf_counter()
    result = train_pti(config, callback=callback)
    rows = []
    for phase, label in (("inversion", "trainer: inversion (c)"), ("tuning", "trainer: LoRA tuning (c)")):
        ts = stamps[phase]
        times = list(np.diff(ts[args.warmup - 1 :]))
        loop_s = result.metrics.get(f"{phase}/seconds", 0.0)
        warm = ts[args.warmup - 1] - (ts[-1] - loop_s)  # loop start to the end of warm-up (compile included)
        row = summarize(label, times, warm, args.batch, device, {"peak_gib": peaks.get(phase)})
        row["compiled"] = bool(result.metrics.get(f"{phase}/compiled", 0.0))
        row["compile_mode"] = resolve_compile(config.compute.compile, device)
        rows.append(row)
    rows[0]["total_run_s"] = time.perf_counter() - began
    return rows


def pti_e2e(args, model_dir: Path, data: Path, work: Path, device: torch.device) -> dict:
    """Wall time of a PTI run with the original project's recommended settings, phase by phase."""
    from lora_ops.models import load_pipeline
    from lora_ops.training.pti import train_pti

    t0 = time.perf_counter()
    load_pipeline(str(model_dir), device="cpu")
    load_s = time.perf_counter() - t0
    config = pti_config(
        args,
        model_dir,
        data,
        work / "pti",
        train_batch_size=1,
        gradient_accumulation_steps=4,
        scale_lr=True,
        learning_rate_unet=1e-4,
        learning_rate_text=1e-5,
        learning_rate_ti=5e-4,
        color_jitter=True,
        lr_scheduler="linear",
        use_template="style",
        max_train_steps_ti=args.steps,
        max_train_steps_tuning=args.steps,
        clip_ti_decay=True,
        weight_decay_ti=0.0,
        weight_decay_lora=0.001,
        continue_inversion=True,
        continue_inversion_lr=1e-4,
        train_text_encoder=True,
        lora_rank=1,
        save_steps=100,
    )
    first: dict[str, float] = {}

    def callback(step, info):
        if info["phase"] not in first:
            sync(device)
            first[info["phase"]] = time.perf_counter()

    began = time.perf_counter()
    result = train_pti(config, callback=callback)
    total = time.perf_counter() - began
    inv, tun = result.metrics.get("inversion/seconds", 0.0), result.metrics.get("tuning/seconds", 0.0)
    return {
        "steps_per_phase": args.steps,
        "effective_batch": 4,
        "resolution": args.resolution,
        "total_s": total,
        "total_minus_model_loading_s": total - load_s,
        "model_loading_s (measured apart)": load_s,
        "inversion_loop_s": inv,
        "tuning_loop_s": tun,
        "other_s (loading, latent caching, checkpoints, saving)": total - inv - tun,
        "compile_mode": resolve_compile(config.compute.compile, device),
        "checkpoints": len(result.checkpoints),
    }


# ---- output -----------------------------------------------------------------------------------------------


def markdown(rows: list[dict], meta: dict) -> str:
    ref = next(r for r in rows if r["variant"].startswith("reference"))
    full = next(r for r in rows if r["variant"].startswith("full"))
    head = (
        f"{meta['arch']}, batch {meta['batch']}, {meta['resolution']} px, rank {meta['rank']}, {meta['device_name']}"
        f"{', gradient checkpointing' if meta.get('gradient_checkpointing') else ''}\n\n"
        "| variant | ms/step | samples/s | warm-up s | peak GiB | × reference | × full |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        lines.append(
            f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.1f} | {r['warmup_s']:.1f} | {peak} | "
            f"{r['samples_per_s'] / ref['samples_per_s']:.2f} | {r['samples_per_s'] / full['samples_per_s']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15", "sd21", "sdxl-tiny", "sdxl"), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--resolution", type=int, default=None, help="pixels (default: 32 tiny and sdxl-tiny, 1024 sdxl, 512 otherwise)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in every variant (memory for time)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 2 CPU, 5 CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 5 CPU, 20 CUDA)")
    parser.add_argument("--compile", default=None, help="the trainer's compile option (default: its default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--pti-e2e", action="store_true", help="also time a whole PTI run")
    parser.add_argument("--steps", type=int, default=1000, help="steps per phase of --pti-e2e")
    parser.add_argument("--skip", default="", help="comma-separated variants not to run: reference,full,trainer")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.resolution = args.resolution or {"tiny": 32, "sdxl-tiny": 32, "sdxl": 1024}.get(args.arch, 512)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.repeats = args.repeats if args.repeats is not None else (20 if cuda else 5)
    for name in ("batch", "rank", "repeats", "steps", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step carries compilation)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = {s for s in args.skip.split(",") if s}
    meta = {
        "arch": args.arch,
        "batch": args.batch,
        "resolution": args.resolution,
        "rank": args.rank,
        "gradient_checkpointing": args.gradient_checkpointing,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    try:
        import diffusers
        import peft
        import transformers

        meta |= {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_dir = make_tiny_model(work / "model", arch=args.arch)
        meta["model_build_s"] = time.perf_counter() - t0
        data = write_images(work / "data", max(args.batch, 4), args.resolution)
        rows = []
        if "reference" not in skip:
            rows.append(baseline_loop("reference", args, model_dir, device))
        if "full" not in skip:
            rows.append(baseline_loop("full", args, model_dir, device))
        if "trainer" not in skip:
            rows += project_trainer(args, model_dir, data, work, device)
        result = {"meta": meta, "rows": rows}
        if args.pti_e2e:
            result["pti_e2e"] = pti_e2e(args, model_dir, data, work, device)
    by = {r["variant"]: r for r in rows}
    ref = next((r for r in rows if r["variant"].startswith("reference")), None)
    full = next((r for r in rows if r["variant"].startswith("full")), None)
    for r in rows:
        if ref:
            r["vs_reference"] = r["samples_per_s"] / ref["samples_per_s"]
        if full:
            r["vs_full"] = r["samples_per_s"] / full["samples_per_s"]
    if ref and full:
        result["table"] = markdown(rows, meta)
        print(result["table"])
    else:
        print(json.dumps(by, indent=1))
    if "pti_e2e" in result:
        print("PTI end to end:", json.dumps(result["pti_e2e"], indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
