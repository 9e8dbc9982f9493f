"""Fine-tuning must teach the shapes world's base model a held-out concept: the safety net for learning.

One fast configuration of the quality benchmark (docs/quality.md): pivotal tuning on the new subject
(a ring learned as "a <s1> circle" from six images in red and blue), one seed. Subject fidelity and
retention must clear thresholds set from the benchmark with margin, and the same measurement must fail
for a run that cannot learn (learning rates 0) and for the trained LoRA switched off (scale 0).
"""

from __future__ import annotations

import json

import pytest
from train_utils import benchmark_module

from lora_ops.shapes import pretrained
from lora_ops.shapes.recipes import RecipeConfig, train_recipe
from lora_ops.shapes.world import get_concept, write_concept_dataset

# measured (docs/quality.md: pti on the ring with prior images, the 4800-step base, three seeds): subject fidelity
# 0.30-0.50, retention 0.79-0.92 (0.35 / 0.85 on this test's seeds; the 2400-step base before it: retention
# 0.66-0.76); the LoRA switched off and a run with learning rates 0 score 0.00. The thresholds keep about half
# of the subject fidelity and three quarters of the retention.
MIN_SUBJECT_FIDELITY = 0.15
MIN_RETENTION = 0.65
CONCEPT_SEEDS = range(12)  # 60 images: 12 per colour
KNOWN_SEEDS = range(2)  # 50 images: 2 per known prompt


@pytest.fixture(scope="module")
def scoring():
    from lora_ops.models import load_pipeline
    from lora_ops.shapes.evaluator import ShapesEvaluator
    from lora_ops.shapes.quality import known_accuracy

    pipe = load_pipeline(pretrained("sd"))
    evaluator = ShapesEvaluator.from_pretrained(pretrained("evaluator"))
    return pipe, evaluator, known_accuracy(pipe, evaluator, KNOWN_SEEDS)


def _train(tmp_path, **overrides):
    data = write_concept_dataset("ring", tmp_path / "data", seed=0)
    return train_recipe("pti", get_concept("ring"), data, tmp_path / "out", pretrained("sd"),
                        RecipeConfig(seed=0, **overrides))  # fmt: skip


def _score(scoring, lora, scale=1.0):
    from lora_ops.shapes.quality import score_lora

    pipe, evaluator, base_known = scoring
    scores, _ = score_lora(pipe, lora, evaluator, get_concept("ring"), "<s1>", CONCEPT_SEEDS, KNOWN_SEEDS,
                           base_known=base_known, scale=scale)  # fmt: skip
    print(f"scale {scale}: {scores}")
    return scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("quality-pti"))


def test_pivotal_tuning_learns_the_new_subject(scoring, trained):
    scores = _score(scoring, trained)
    assert scores["subject_fidelity"] >= MIN_SUBJECT_FIDELITY, scores
    assert scores["retention"] >= MIN_RETENTION, scores


def test_the_quality_check_fails_with_the_lora_switched_off(scoring, trained):
    scores = _score(scoring, trained, scale=0.0)
    assert scores["subject_fidelity"] < MIN_SUBJECT_FIDELITY, scores


def test_the_quality_check_fails_for_a_run_that_cannot_learn(scoring, tmp_path):
    # with every learning rate 0 no step changes a weight (AdamW's decay and the token-norm pull scale with the
    # learning rate too), so one step per phase ends where the full budget would
    lora = _train(tmp_path, steps=2, learning_rate_ti=0.0, learning_rate_unet=0.0, learning_rate_text=0.0)
    scores = _score(scoring, lora)
    assert scores["subject_fidelity"] < MIN_SUBJECT_FIDELITY, scores


def test_evaluate_reports_the_classifier_metrics(trained, tmp_path):
    """The evaluate step's optional classifier: the LoRA's images show the ring, the base's do not."""
    from lora_ops.evaluate import EvaluateConfig, evaluate_loras
    from lora_ops.shapes.quality import GUIDANCE

    result = evaluate_loras(
        EvaluateConfig(
            model=pretrained("sd"),
            loras=[trained],
            names=["pti"],
            output_dir=tmp_path / "eval",
            prompts=["a red {token} circle", "a green {token} circle", "a yellow {token} circle"],
            class_word="",
            instance_dir=write_concept_dataset("ring", tmp_path / "data"),
            clip_model=str(pretrained("clip")),
            dino_model=str(pretrained("dino")),
            classifier_model=pretrained("evaluator"),
            classifier_target="shape=ring",
            seeds=[0, 1, 2, 3],
            num_inference_steps=20,
            guidance_scale=GUIDANCE,  # the world's (at evaluate's default 7.5 its rings come out too rough to count)
            sweep_steps=3,
            select_metric="classifier",
        )
    )
    base = result.metrics["base"]["mean"]
    lora = result.metrics["loras"]["pti"]["scales"]["1"]["mean"]
    assert base["classifier"] <= 0.1 < lora["classifier"], (base, lora)
    assert base["classifier_prompt"] >= 0.6  # the base draws the prompted colour (measured 1.0)
    assert lora["clip_i"] > base["clip_i"] and lora["dino"] > base["dino"]  # closer to the instance images
    assert "CLASSIFIER" in result.comparison_table.read_text()
    assert result.best["metric"] == "classifier" and result.sweep_grid.is_file()


def test_pivotal_tuning_splits_its_budget_by_the_inversion_share():
    assert RecipeConfig().pti_steps() == (800, 800)  # what the demo and the benchmark run by default
    assert RecipeConfig(inversion_share=0.75).pti_steps() == (1200, 400)
    assert RecipeConfig(steps=2, inversion_share=0.99).pti_steps() == (1, 1)  # each phase keeps a step
    with pytest.raises(ValueError, match="inversion_share"):
        RecipeConfig(inversion_share=1.0)
    with pytest.raises(ValueError, match="prior_loss_weight"):
        RecipeConfig(prior_loss_weight=float("nan"))


def test_the_quality_benchmark_refuses_bad_settings_before_loading_a_model(tmp_path, capsys):
    bench = benchmark_module("quality")
    for bad, named in ((["--rank", "0"], "rank=0"), (["--prior-loss-weight", "-1"], "prior_loss_weight=-1.0"),
                       (["--inversion-share", "1"], "inversion_share=1.0")):  # fmt: skip
        with pytest.raises(SystemExit):
            bench.main(["--out", str(tmp_path), *bad])
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a diffusers folder"):
        bench.main(["--out", str(tmp_path), "--model", str(tmp_path)])


def test_the_quality_benchmark_runs_in_parts_and_resumes(tmp_path, capsys):
    """`benchmarks/quality.py` at smoke scale: a second run with --resume keeps the first run's cell (its file and
    scores) and trains only the new one; results.md has both; other settings are refused, naming them."""
    bench = benchmark_module("quality")

    def small(*recipes, steps=2):
        return ["--out", str(tmp_path), "--concepts", "ring", "--seeds", "0", "--steps", str(steps),
                "--concept-seeds", "1", "--known-seeds", "1", "--extras", "--recipes", *recipes]  # fmt: skip

    first = bench.main(small("ti"))
    ti_row = first["cells"]["ring"]["ti"][0]
    assert (tmp_path / ti_row["file"]).is_file() and 0.0 <= ti_row["subject_fidelity"] <= 1.0
    capsys.readouterr()
    second = bench.main([*small("ti", "lora"), "--resume"])
    log = capsys.readouterr().out
    assert "[ring] ti seed 0: kept from the earlier run" in log
    assert "[ring] lora seed 0: kept" not in log and "[ring] lora seed 0: subject_fidelity=" in log
    assert second["cells"]["ring"]["ti"] == [ti_row] and len(second["cells"]["ring"]["lora"]) == 1
    table = (tmp_path / "results.md").read_text()
    assert "| ti |" in table and "| lora |" in table
    with pytest.raises(SystemExit, match=r"other settings: steps=2 \(now 3\)"):
        bench.main([*small("ti", steps=3), "--resume"])
    # a changed base under the same folder name (a new shipped base): its weights differ, the cells are not kept
    results = json.loads((tmp_path / "results.json").read_text())
    results["args"]["model_sha256"] = "0" * 64
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"other settings: model_sha256='0000"):
        bench.main([*small("ti"), "--resume"])
