"""The shapes world: the renderer, the pretraining command, and the shipped models' own checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lora_ops.hashing import sha256_file
from lora_ops.shapes import manifest, pretrained
from lora_ops.shapes.world import (
    CONCEPTS,
    Spec,
    all_specs,
    caption,
    get_concept,
    known_specs,
    render,
    render_none,
    write_concept_dataset,
)


def lora_ops_cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "lora_ops", *args], capture_output=True, text=True, timeout=timeout)
    return proc


# ---- the renderer -----------------------------------------------------------------------------------------


def test_render_is_seeded_and_specs_differ():
    a = np.asarray(render(Spec("ring", "red"), np.random.default_rng(3)))
    b = np.asarray(render(Spec("ring", "red"), np.random.default_rng(3)))
    c = np.asarray(render(Spec("ring", "red"), np.random.default_rng(4)))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # the same draw of size/position/background with another shape or colour gives another image
    d = np.asarray(render(Spec("circle", "red"), np.random.default_rng(3)))
    e = np.asarray(render(Spec("ring", "blue"), np.random.default_rng(3)))
    assert not np.array_equal(a, d) and not np.array_equal(a, e)
    assert render_none(np.random.default_rng(0)).size == (32, 32)


def test_world_concepts_and_captions():
    assert len(known_specs()) == 25 and all(s.style == "filled" for s in known_specs())
    known_shapes = {s.shape for s in known_specs()}
    assert {"ring", "star"}.isdisjoint(known_shapes)  # held out from the base
    assert len(all_specs()) == 70
    assert caption(Spec("circle", "red")) == "a red circle"
    assert caption(Spec("square", "blue", "striped")) == "a blue square in the style of stripes"
    ring = get_concept("ring")
    assert ring.token_map == "ring|<s1> circle"
    assert ring.prompt_for("green", "<s1>") == "a green <s1> circle"
    assert ring.text_for("green") == "a green circle"
    assert {s.colour for s in ring.instances} == {"red", "blue"}  # prompting green tests recontextualisation


@pytest.mark.parametrize("bad", [dict(shape="hexagon", colour="red"), dict(shape="circle", colour="pink"),
                                 dict(shape="circle", colour="red", style="dotted")])  # fmt: skip
def test_spec_refuses_unknown_values(bad):
    key = [k for k in bad if bad[k] in ("hexagon", "pink", "dotted")][0]
    with pytest.raises(ValueError, match=key):
        Spec(**bad)


def test_concept_dataset_command(tmp_path):
    proc = lora_ops_cli("shapes", "dataset", "ring", "--out", str(tmp_path / "ring"))
    assert proc.returncode == 0, proc.stderr
    images = sorted((tmp_path / "ring").glob("*.png"))
    assert len(images) == len(CONCEPTS["ring"].instances) == 6
    assert (tmp_path / "ring" / "ring_00.txt").read_text().strip() in ("a red ring", "a blue ring")
    assert "ring|<s1> circle" in proc.stdout
    bad = lora_ops_cli("shapes", "dataset", "hexagon", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "concept='hexagon'" in bad.stderr
    # the same seed gives the same dataset
    again = write_concept_dataset("ring", tmp_path / "again", seed=0)
    assert (again / "ring_03.png").read_bytes() == (tmp_path / "ring" / "ring_03.png").read_bytes()


# ---- pretraining ------------------------------------------------------------------------------------------


def test_pretrain_command_smoke(tmp_path):
    """The one pretraining command, for a few steps: every model is written, loads, and is in the manifest."""
    out = tmp_path / "world"
    proc = lora_ops_cli("shapes", "pretrain", "--out", str(out), "--steps-scale", "0.003", "--latent-pool", "500",
                        "--check-images", "25")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert set(summary["checks"]) == {"evaluator", "clip", "base"}
    m = manifest(out)
    assert m["command"].startswith("lora-ops shapes pretrain --out")
    assert m["config"]["seed"] == 0 and m["versions"]["torch"]
    files = {f["path"]: f for f in m["files"]}
    for must in ("sd/model_index.json", "sd/unet/diffusion_pytorch_model.safetensors", "clip/model.safetensors",
                 "dino/model.safetensors", "evaluator/model.safetensors"):  # fmt: skip
        assert must in files
        assert files[must]["sha256"] == sha256_file(out / must)
    assert not list(tmp_path.glob(".*partial"))  # published all at once
    # a second run into the same folder is refused without --overwrite (the first run's files are kept)
    again = lora_ops_cli("shapes", "pretrain", "--out", str(out), "--steps-scale", "0.003")
    assert again.returncode == 2 and "not empty" in again.stderr
    assert (out / "manifest.json").is_file()

    from lora_ops.models import load_pipeline
    from lora_ops.shapes.evaluator import ShapesEvaluator

    pipe = load_pipeline(out / "sd")
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.scaling_factor != 0.18215
    assert len(ShapesEvaluator.from_pretrained(out / "evaluator").classify([render(Spec("star", "red"),
                                                                              np.random.default_rng(0))])) == 1  # fmt: skip


# ---- the shipped models -----------------------------------------------------------------------------------


def test_shipped_models_match_their_manifest():
    root = pretrained("sd").parent
    m = manifest()
    total = 0
    for f in m["files"]:
        path = root / f["path"]
        assert path.is_file(), f["path"]
        assert path.stat().st_size == f["size"] and sha256_file(path) == f["sha256"], f["path"]
        total += f["size"]
    assert total <= 40 * 2**20
    assert m["command"].startswith("lora-ops shapes pretrain")


def test_shipped_evaluator_is_right_on_fresh_renders():
    from lora_ops.shapes.evaluator import ShapesEvaluator
    from lora_ops.shapes.pretrain import check_evaluator

    evaluator = ShapesEvaluator.from_pretrained(pretrained("evaluator"))
    checks = check_evaluator(evaluator, n=700, seed=12345)  # not the pretraining seed's renders
    assert checks["accuracy"] >= 0.98, checks
    assert checks["none_accuracy"] >= 0.9, checks


def test_shipped_clip_picks_the_right_caption():
    from lora_ops.shapes.pretrain import check_clip

    checks = check_clip(pretrained("clip"), n=700, seed=54321)
    assert checks["caption_accuracy"] >= 0.9, checks


# the goal; measured 0.94-0.96 at the world's guidance on three sets of seeds (docs/quality.md)
MIN_BASE_ACCURACY = 0.9


def test_shipped_base_draws_the_prompted_known_concept():
    """At its default guidance the base draws the prompted shape and colour (judged by the evaluator)."""
    from lora_ops.shapes.quality import GUIDANCE, base_accuracy

    result = base_accuracy(pretrained("sd"), pretrained("evaluator"), seeds=range(100, 104), guidance=GUIDANCE)
    assert result["images"] == 100
    assert result["known_accuracy"] >= MIN_BASE_ACCURACY, result
