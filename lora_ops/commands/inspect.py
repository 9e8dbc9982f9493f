"""`lora-ops inspect FILE`: format, base model, targets, ranks, alphas, tokens, per-module norms, size."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import examples


def _norm(mod) -> float:
    """‖B A‖_F from the factors: ‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ), no dense ΔW."""
    a, b = mod.lora_A.float().flatten(1), mod.lora_B.float().flatten(1)
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


def _kind(name: str) -> str:
    """The layer kind of a module name: `to_q`, `to_out.0`, `ff.net.0.proj` -> `proj`, `conv1`."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if re.fullmatch(r"\d+", parts[-1]) and len(parts) > 1 else parts[-1]


def summarize(path: str | Path, base=None) -> dict:
    """Everything `inspect` prints, as a JSON-serialisable dict."""
    from ..formats import lora_family, lora_from_raw, read_raw
    from ..lora_file import COMPONENTS

    path = Path(path)
    fmt, tensors, metadata = read_raw(path)
    if fmt == "lora_diffusion" and base is None:
        from ..convert import convert_legacy_to_native
        from ..lora_file import lora_from_state_dict

        lora = lora_from_state_dict(convert_legacy_to_native(tensors, metadata, None))
    else:
        lora = lora_from_raw(fmt, tensors, metadata, base, f"<{path.stem}>")
    alphas = {}
    if fmt == "kohya":
        alphas = {k[: -len(".alpha")]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    elif fmt == "native":
        alphas = lora.metadata.get("alphas") or {}
    elif fmt == "diffusers" and metadata.get("lora_adapter_metadata"):
        alphas = {k: v for k, v in json.loads(metadata["lora_adapter_metadata"]).items() if "alpha" in k}
    modules = {}
    for comp in COMPONENTS:
        for name, mod in lora.component(comp).items():
            modules[f"{comp}.{name}"] = {
                "r": mod.r,
                "kind": "conv" if mod.is_conv else "linear",
                "shape": [mod.out_features, *mod.lora_A.shape[1:]],
                "norm": round(_norm(mod), 6),
            }
    targets = {comp: sorted({_kind(n) for n in lora.component(comp)}) for comp in COMPONENTS}
    if fmt == "lora_diffusion" and base is None:  # modules are only indices: show the recorded classes
        targets = {c: [f"class {k}" for k in json.loads(metadata.get(c) or "[]")] for c in COMPONENTS}
    ranks = sorted({m["r"] for m in modules.values()})
    return {
        "file": str(path),
        "format": fmt,
        "size_bytes": path.stat().st_size,
        "base_model": metadata.get("base_model") or metadata.get("ss_sd_model_name") or "",
        "family": lora_family(lora),
        # text_encoder_2 only where there is one (SDXL), so SD 1.x/2.x reports read as before
        "modules": {c: len(lora.component(c)) for c in COMPONENTS if c != "text_encoder_2" or lora.text_encoder_2},
        "targets": targets,
        "ranks": ranks,
        "alphas": alphas,
        "tokens": {
            t: {"dim": int(v.shape[-1]), "norm": round(float(v.float().norm()), 6)}
            # SDXL: the row in the second text encoder too
            | (
                {"dim_2": int(lora.tokens_2[t].shape[-1]), "norm_2": round(float(lora.tokens_2[t].float().norm()), 6)}
                if t in lora.tokens_2
                else {}
            )  # fmt: skip
            for t, v in lora.tokens.items()
        },
        "legacy_order": lora.metadata.get("legacy_order"),
        "per_module": modules,
    }


def run(args) -> int:
    info = summarize(args.file, base=args.base)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file:        {info['file']} ({info['size_bytes']:,} bytes)")
    print(f"format:      {info['format']}")
    print(f"base model:  {info['base_model'] or '(not recorded)'}   family: {info['family']}")
    counts = [f"{c} {n}" for c, n in info["modules"].items()]
    print(f"modules:     {', '.join(counts)}")
    for comp, kinds in info["targets"].items():
        if kinds:
            print(f"targets:     {comp}: {', '.join(kinds)}")
    print(f"ranks:       {info['ranks']}")
    if info["alphas"]:
        values = sorted({json.dumps(v) for v in info["alphas"].values()})
        print(f"alphas:      {len(info['alphas'])} entries, values {', '.join(values[:8])}")
    for token, t in info["tokens"].items():
        print(f"token:       {token} dim {t['dim']} norm {t['norm']:.4f}")
    if info["legacy_order"]:
        print(f"module order: {info['legacy_order']}")
    if args.modules:
        print(f"{'module':<90} {'r':>4} {'kind':>6} {'|dW|':>10}")
        for name, m in info["per_module"].items():
            print(f"{name:<90} {m['r']:>4} {m['kind']:>6} {m['norm']:>10.4e}")
    else:
        norms = [m["norm"] for m in info["per_module"].values()]
        if norms:
            print(
                f"|dW|_F:      min {min(norms):.4e} max {max(norms):.4e} ({len(norms)} modules; --modules lists each)"
            )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="describe a LoRA or embedding file of any supported format",
        **examples(
            "lora-ops inspect my_lora.safetensors",
            "lora-ops inspect lora_disney.safetensors --base ./sd15 --modules",
            "lora-ops inspect my_lora.safetensors --json",
        ),
    )
    p.add_argument("file")
    p.add_argument("--base", help="base model folder: names lora_diffusion modules and checks shapes")
    p.add_argument("--modules", action="store_true", help="list every module with its rank and ‖ΔW‖_F")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=run)
