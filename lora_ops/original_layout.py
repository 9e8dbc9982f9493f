"""The original UNet layout (CompVis ldm for SD 1.x/2.x, Stability's sgm for SDXL) that one-file checkpoints
(`model.diffusion_model.*`) and kohya's SDXL LoRA names use, from diffusers' UNet2DConditionModel names.

The block indices follow from the UNet's config (`layers_per_block`, which up blocks hold attention), so the
mapping covers SD 1.x, SD 2.x, SDXL and the tiny test models alike:
`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (two layers per block); ResNets
`conv1` / `conv2` / `time_emb_proj` / `conv_shortcut` / `norm1` / `norm2` -> `in_layers.2` / `out_layers.3`
/ `emb_layers.1` / `skip_connection` / `in_layers.0` / `out_layers.0`; the down/upsampler convs ->
`input_blocks.<i>.0.op` / `output_blocks.<i>.<1|2>.conv` (2 after an attention).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text and size embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    head, dot, tail = rest.partition(".")
    return _RESNET.get(head, head) + dot + tail


def original_unet_name(name: str, unet_config: Mapping) -> str:
    """A diffusers UNet module name or state-dict key in the original layout, for the UNet of `unet_config`."""
    per_block = unet_config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block={per_block!r}: the original layout needs one number for every block")
    step = per_block + 1  # original blocks per level: the ResNets (+ attention) and the down/upsampler
    for diffusers, original in _TOP.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return original + name[len(diffusers) :]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        where, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        index = 1 + i * step + j if where == "down" else i * step + j
        block = "input_blocks" if where == "down" else "output_blocks"
        return f"{block}.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", name):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op{m[2] or ''}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?", name):
        i = int(m[1])
        after = 2 if "CrossAttn" in str(unet_config["up_block_types"][i]) else 1
        return f"output_blocks.{i * step + per_block}.{after}.conv{m[2] or ''}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_resnet(rest)}"
    raise ValueError(f"unet {name!r} has no place in the original UNet layout")
