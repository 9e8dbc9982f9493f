"""Evaluation: generation with fixed seeds, CLIP-T/CLIP-I/DINO, grids, sweeps, comparison, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lora_ops import LoraConfig, LoraFile, extract_lora, inject_lora, load_pipeline, save_lora
from lora_ops.evaluate import EvaluateConfig, evaluate_loras, select_best
from lora_ops.metrics import clip_t, mean_similarity, pairwise_cosine
from lora_ops.tiny_vision import make_tiny_clip, make_tiny_dino

PROMPTS = ["a photo of {token}", "{token} on the beach"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """Two LoRA files (r=1, r=2, learned token <s1>), instance images, tiny CLIP and DINO."""
    root = tmp_path_factory.mktemp("evaluate")
    pipe = load_pipeline(tiny_model)
    torch.manual_seed(0)
    loras = []
    for r in (1, 2):
        inject_lora(pipe.unet, LoraConfig(target_modules="unet", r=r, init="random"), f"r{r}")
        inject_lora(pipe.text_encoder, LoraConfig(target_modules="text_encoder", r=r, init="random"), f"r{r}")
        lora = LoraFile(
            unet=extract_lora(pipe.unet, "unet", f"r{r}"),
            text_encoder=extract_lora(pipe.text_encoder, "text_encoder", f"r{r}"),
            tokens={"<s1>": torch.randn(32)},
        )
        loras.append(save_lora(root / f"rank{r}.safetensors", lora))
    instances = root / "instances"
    instances.mkdir()
    for i in range(3):
        noise = np.random.RandomState(i).randint(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(noise).save(instances / f"{i}.png")
        Image.new("L", (48, 48), 255).save(instances / f"{i}.mask.png")  # masks are not instance images
    return {
        "model": tiny_model,
        "loras": loras,
        "instances": instances,
        "clip": make_tiny_clip(root / "clip"),
        "dino": make_tiny_dino(root / "dino"),
        "root": root,
    }


def _config(setup, out, **kw):
    base = dict(
        prompts=PROMPTS,
        class_word="dog",
        instance_dir=setup["instances"],
        clip_model=str(setup["clip"]),
        dino_model=str(setup["dino"]),
        scales=[1.0, (1.0, 0.0)],
        seeds=[0],
        num_inference_steps=2,
        sweep_steps=3,
    )
    base.update(kw)
    model = base.pop("model", setup["model"])
    return EvaluateConfig(model, setup["loras"], out, **base)


@pytest.fixture(scope="module")
def result(setup):
    return evaluate_loras(_config(setup, setup["root"] / "run"))


def _digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_outputs_and_metric_ranges(result):
    out = result.output_dir
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics == result.metrics
    assert set(metrics["loras"]) == {"rank1", "rank2"}
    for entry in metrics["loras"].values():
        assert entry["token"] == "<s1>"
        assert set(entry["scales"]) == {"1", "1/0"}
        for summary in entry["scales"].values():
            assert set(summary["per_prompt"]) == set(PROMPTS)
            assert set(summary["mean"]) == {"clip_t", "clip_i", "dino"}
    values = [
        v
        for summary in [metrics["base"]] + [s for e in metrics["loras"].values() for s in e["scales"].values()]
        for per in summary["per_prompt"].values()
        for m in per.values()
        for v in m["per_seed"]
    ]
    assert len(values) == 3 * 2 * 5  # 3 metrics x 2 prompts x (base + 2 LoRAs x 2 scales)
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert metrics["best"]["lora"] in metrics["loras"] and metrics["best"]["scale"] in ("1", "1/0")
    assert "**best**" in result.comparison_table.read_text()

    for name in ("base", "rank1", "rank2"):
        assert Image.open(result.grids[name]).size[1] >= 64
    comparison = Image.open(result.comparison_grid)
    assert comparison.height == 16 + 5 * 64  # base + 2 LoRAs x 2 scales, one row each
    gif = Image.open(result.gifs["rank1"])
    assert gif.n_frames == 3
    assert Image.open(result.sweep_grid).width > 3 * 64
    assert (out / "rank2" / "images" / "scale_1_0" / "p1_seed0.png").is_file()


def test_lora_changes_the_images(result):
    out = result.output_dir
    base = np.asarray(Image.open(out / "base" / "images" / "p0_seed0.png"), dtype=np.int16)
    full = np.asarray(Image.open(out / "rank2" / "images" / "scale_1" / "p0_seed0.png"), dtype=np.int16)
    assert np.abs(base - full).mean() > 1.0
    gif = Image.open(result.gifs["rank2"])
    first = np.asarray(gif.convert("RGB"), dtype=np.int16)
    gif.seek(gif.n_frames - 1)
    assert np.abs(first - np.asarray(gif.convert("RGB"), dtype=np.int16)).mean() > 1.0  # scale 0 vs 1


def test_cli_same_seed_same_images_and_metrics(result, setup, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "lora_ops", "evaluate", str(setup["model"]), *map(str, setup["loras"])]
    cmd += ["--out", str(out), "--class-word", "dog", "--instance-dir", str(setup["instances"])]
    cmd += ["--clip-model", str(setup["clip"]), "--dino-model", str(setup["dino"])]
    cmd += ["--scale", "1.0", "--scale", "1.0:0.0", "--seed", "0", "--steps", "2", "--sweep-steps", "3"]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["best"] == result.best
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    assert _digests(out) == _digests(result.output_dir)  # identical images, grids, GIFs, tables


def test_cli_error_is_one_line(setup, tmp_path):
    from lora_ops.cli import main

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    cfg = ["evaluate", str(setup["model"]), str(bad), "--out", str(tmp_path / "o"), "--select-metric", "clip_t"]
    assert main([*cfg, "--clip-model", str(setup["clip"])]) == 2
    assert not (tmp_path / "o").exists()


def test_select_best_respects_clip_t_tolerance():
    candidates = [
        {"lora": "r1", "scale": "1", "mean": {"clip_t": 0.30, "clip_i": 0.70}},
        {"lora": "r4", "scale": "1", "mean": {"clip_t": 0.20, "clip_i": 0.90}},  # overfit: text ignored
        {"lora": "r8", "scale": "1", "mean": {"clip_t": 0.29, "clip_i": 0.80}},
    ]
    assert select_best(candidates)["lora"] == "r8"
    assert select_best(candidates, tolerance=0.2)["lora"] == "r4"
    assert select_best(candidates, metric="clip_t")["lora"] == "r1"
    with pytest.raises(ValueError, match="dino"):
        select_best(candidates, metric="dino")


def test_metric_functions():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert pairwise_cosine(a, b).shape == (4, 3)
    assert torch.allclose(clip_t(a, a), torch.ones(4))
    assert torch.allclose(clip_t(a, -a), -torch.ones(4))
    assert torch.allclose(mean_similarity(a, b), (a @ b.T).mean(-1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scales": ["x"]}, "scales"),
        ({"seeds": []}, "seeds"),
        ({"instance_dir": None}, "select_metric='clip_i' needs instance_dir"),
        ({"names": ["a", "a"]}, "names="),
        ({"sweep_steps": 1}, "sweep_steps=1"),
        ({"clip_model": "nope"}, "clip_model='nope'"),
        ({"prompts": [" "]}, "prompts="),
        ({"model": "/no/such/model"}, "model='/no/such/model'"),
    ],
)
def test_bad_config_names_the_argument(setup, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(setup, tmp_path / "o", **kwargs)


def test_prompt_templates():
    from lora_ops.evaluate import _fill

    assert _fill("a photo of {token} on the beach", "<s1><s2>", ["<s1>", "<s2>"], "dog") == (
        "a photo of <s1><s2> on the beach",
        "a photo of dog on the beach",
    )
    # literal learned tokens in a template are scored (and given to the base model) as the class word
    assert _fill("<s1> in the snow", "<s1>", ["<s1>"], "cat") == ("<s1> in the snow", "cat in the snow")


def test_classifier_options_are_checked(tmp_path):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    base = dict(model="org/name", loras=[lora], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="classifier_target='ring' must look like 'shape=ring'"):
        EvaluateConfig(**base, classifier_model=tmp_path, classifier_target="ring")
    with pytest.raises(ValueError, match="classifier_target needs classifier_model"):
        EvaluateConfig(**base, classifier_target="shape=ring")
    with pytest.raises(ValueError, match="select_metric='classifier' needs"):
        EvaluateConfig(**base, select_metric="classifier")
    with pytest.raises(FileNotFoundError, match="classifier_model="):
        EvaluateConfig(**base, classifier_model=tmp_path / "missing")


def test_a_one_file_base_evaluates_as_its_folder_does(result, setup, tmp_path):
    """A community checkpoint (one .safetensors file) as the base, with its architecture's configs."""
    from lora_ops.single_file import save_single_file

    checkpoint = save_single_file(load_pipeline(setup["model"]), tmp_path / "base.safetensors")
    one_file = evaluate_loras(_config(setup, tmp_path / "one", model=checkpoint, model_config=setup["model"]))
    pictures = {k: v for k, v in _digests(result.output_dir).items() if k.endswith((".png", ".gif"))}
    assert pictures and {k: v for k, v in _digests(one_file.output_dir).items() if k in pictures} == pictures
    assert one_file.best == result.best
