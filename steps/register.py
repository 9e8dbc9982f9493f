"""register: the best evaluated LoRA -> an MLflow model version, alias `champion` only when it is better.

    python -m lora_pipeline.steps.register --run-id RUN_ID --evaluation URI --model-name NAME
        [--promotion-metric clip_i] [--clip-t-tolerance 0.01]

The version is an MLflow pyfunc model (see `lora_pipeline.serving`) tagged with its lineage. It becomes
`champion` when its promotion metric beats the current champion's and its CLIP-T is not lower than the
champion's by more than the tolerance; otherwise it becomes `challenger`. Re-running for the same
pipeline run finds the version it created before (tag `pipeline_run_id`) and creates no second one.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import common
from .artifacts import SOURCE_DATASET, fetch, parse_uri, run_prefix_of, sha256_file
from .tracking import KEY_TAG, quote, run_key, start_step

STEP = "register"
CHAMPION, CHALLENGER = "champion", "challenger"


def build_parser():
    p = common.parser(STEP, __doc__.splitlines()[0], compute=False, out_required=False)
    p.add_argument("--evaluation", required=True, help="output prefix of the evaluate step")
    p.add_argument("--model-name", required=True, help="registered model name")
    p.add_argument("--promotion-metric", default="clip_i", help="metric that must improve (default clip_i)")
    p.add_argument(
        "--clip-t-tolerance",
        type=float,
        default=0.01,
        help="how much lower than the champion's CLIP-T a new champion's may be (default 0.01)",
    )
    return p


def decide(
    new: dict[str, float], champion: dict[str, float] | None, metric: str, clip_t_tolerance: float
) -> tuple[str, str]:
    """(alias, reason): champion when there is none, or when `metric` improves and CLIP-T holds."""
    if metric not in new:
        raise ValueError(f"--promotion-metric={metric!r}: the evaluation has no such metric (has {sorted(new)})")
    if champion is None:
        return CHAMPION, "no champion yet"
    if metric not in champion:
        return CHAMPION, f"the champion has no {metric}"
    if not new[metric] > champion[metric]:
        return CHALLENGER, f"{metric} {new[metric]:.4f} does not beat the champion's {champion[metric]:.4f}"
    if "clip_t" in new and "clip_t" in champion and new["clip_t"] < champion["clip_t"] - clip_t_tolerance:
        return CHALLENGER, (
            f"clip_t {new['clip_t']:.4f} is more than {clip_t_tolerance} below the champion's {champion['clip_t']:.4f}"
        )
    return CHAMPION, f"{metric} {new[metric]:.4f} beats the champion's {champion[metric]:.4f}"


def _version_metrics(mv) -> dict[str, float]:
    return {k[len("metric.") :]: float(v) for k, v in (mv.tags or {}).items() if k.startswith("metric.")}


def _existing_version(client, name: str, run_id: str):
    found = client.search_model_versions(f"name = {quote(name)} and tags.`{KEY_TAG}` = '{run_key(run_id)}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _set_alias(client, name: str, alias: str, version, attempts: int = 6) -> None:
    """set_registered_model_alias, retried when a concurrent registration created the same alias at the same
    moment (the tracking store's first insert of an alias races: a UNIQUE-constraint error; the retry updates)."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            text = str(exc)
            if attempt == attempts - 1 or not ("UNIQUE constraint" in text or "already exists" in text.lower()):
                raise
            time.sleep(0.2 * (attempt + 1))


def _replay(client, name: str, current, metric: str, tolerance: float):
    """The champion after applying `decide` in version order to every registered version newer than the
    current champion (none: every version), skipping versions tagged `decision=rejected` by a person."""
    versions = client.search_model_versions(f"name = {quote(name)}")
    since = int(current.version) if current is not None else 0
    champion = current
    for mv in sorted((v for v in versions if int(v.version) > since), key=lambda v: int(v.version)):
        if (mv.tags or {}).get("decision") == "rejected" or not _version_metrics(mv):
            continue
        best = _version_metrics(champion) if champion is not None else None
        if decide(_version_metrics(mv), best, metric, tolerance)[0] == CHAMPION:
            champion = mv
    return champion, {int(v.version) for v in versions}


def _apply_decision(client, name: str, mv, metric: str, tolerance: float, attempts: int = 8) -> tuple[str, str]:
    """Set `champion` by replaying the rule over every version newer than the current champion, then verify.

    Two registrations racing each decide from what they see; each re-reads the alias and the version list
    after setting the alias and decides again when either changed, so the last writer has seen every
    version and the result is what one serialised decision in version order would give.
    """
    for _ in range(attempts):
        current = _champion(client, name)
        champion, seen = _replay(client, name, current, metric, tolerance)
        if champion is not None and (current is None or champion.version != current.version):
            _set_alias(client, name, CHAMPION, champion.version)
        after = _champion(client, name)
        _, seen_after = _replay(client, name, after, metric, tolerance)
        if after is not None and champion is not None and after.version == champion.version and seen_after <= seen:
            break
    else:
        raise RuntimeError(f"{name}: the champion alias kept changing under concurrent registrations; retry")
    if champion.version == mv.version:
        alias = CHAMPION
        if current is not None and current.version == mv.version:
            reason = "already the champion"
        else:
            reason = decide(_version_metrics(mv), _version_metrics(current) if current else None, metric, tolerance)[1]
    else:
        alias = CHALLENGER
        verdict, reason = decide(_version_metrics(mv), _version_metrics(champion), metric, tolerance)
        if verdict == CHAMPION:  # it beat the old champion, but a version registered beside it did better
            reason = f"version {champion.version}, registered alongside it, did better by {metric}"
        _set_alias(client, name, CHALLENGER, mv.version)
    client.set_model_version_tag(name, mv.version, "decision", alias)
    client.set_model_version_tag(name, mv.version, "decision_reason", reason)
    return alias, reason


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    args = common.parse(build_parser(), argv, inputs=("--evaluation",))
    if not math.isfinite(args.clip_t_tolerance) or args.clip_t_tolerance < 0:
        raise ValueError(f"--clip-t-tolerance={args.clip_t_tolerance}: must be a finite number >= 0")
    name = args.model_name
    quote(name)  # a name MLflow's search cannot express fails here, before anything is written
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ValueError(f"{STEP}: MLFLOW_TRACKING_URI must be set (this step writes to the model registry)")
    with tempfile.TemporaryDirectory(prefix="lora-register-") as tmp:
        # every input is checked before any MLflow run is opened: bad input never touches the run tree
        evaluation = fetch(args.evaluation, Path(tmp) / "evaluation", name="--evaluation", require_manifest=True,
                           include=lambda p: p == "metrics.json")  # fmt: skip
        manifest = evaluation.manifest or {}
        if manifest.get("step") != "evaluate":
            raise ValueError(
                f"--evaluation={args.evaluation}: a {manifest.get('step')!r} output, not an evaluate output"
            )
        best = manifest["result"]["best"]
        metrics = {k: float(v) for k, v in best.get("metrics", {}).items() if isinstance(v, (int, float))}
        if args.promotion_metric not in metrics:
            raise ValueError(
                f"--promotion-metric={args.promotion_metric!r}: the evaluation has no such metric (has {sorted(metrics)})"
            )
        with start_step(
            STEP,
            args.run_id,
            args.experiment,
            params={
                "evaluation": args.evaluation,
                "model_name": name,
                "promotion_metric": args.promotion_metric,
                "clip_t_tolerance": args.clip_t_tolerance,
            },
            required=True,
        ) as tracker:
            client = tracker.client
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                code = getattr(exc, "error_code", "")
                if "already exists" not in str(exc).lower() and code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = _existing_version(client, name, args.run_id)
            reused = mv is not None
            if mv is None:
                mv = _create_version(tracker, client, args, manifest, best, metrics, evaluation.sha256, Path(tmp))
            alias, reason = _apply_decision(client, name, mv, args.promotion_metric, args.clip_t_tolerance)
            tracker.set_tags({"model_name": name, "model_version": mv.version, "alias": alias})
    return {
        "step": STEP,
        "run_id": args.run_id,
        "model_name": name,
        "version": int(mv.version),
        "alias": alias,
        "reason": reason,
        "model_uri": f"models:/{name}/{mv.version}",
        "lora": best["lora"],
        "metrics": metrics,
        "reused": reused,
    }


def _create_version(tracker, client, args, manifest, best, metrics, evaluation_sha, tmp: Path):
    from lora_ops import load_lora

    from ..serving import LORA_FILE, save_pyfunc

    lora_prefix = str(parse_uri(best["lora"], "best.lora").as_prefix())
    fetched = fetch(lora_prefix, tmp / "lora", name="best candidate", require_manifest=True,
                    include=lambda p: p == LORA_FILE)  # fmt: skip
    lora_path = fetched.path / LORA_FILE
    lora = load_lora(lora_path)
    ranks = sorted({r for comp in lora.ranks().values() for r in comp.values()})
    inputs = manifest.get("inputs", {})
    metadata = {
        "base_model": inputs.get("base_model", {}).get("uri") or lora.metadata.get("base_model"),
        "base_model_sha256": inputs.get("base_model", {}).get("sha256"),
        # a one-file checkpoint base: the model its configs come from (serving loads the base with it)
        "base_model_config": inputs.get("base_model", {}).get("config"),
        "dataset_sha256": inputs.get("dataset", {}).get("sha256"),
        SOURCE_DATASET: manifest.get(SOURCE_DATASET),
        "run_prefix": run_prefix_of(args.evaluation),
        "tokens": list(lora.tokens),
        "ranks": ranks,
        "lora_uri": best["lora"],
        "lora_manifest_sha256": fetched.sha256,
        "lora_sha256": sha256_file(lora_path),
        "evaluation_uri": args.evaluation,
        "evaluation_manifest_sha256": evaluation_sha,
        "metrics": metrics,
        "scale": best.get("scale"),
        "pipeline_run_id": args.run_id,
        **common.lineage_tags(),
    }
    if not metadata["base_model"]:
        raise ValueError(f"--evaluation={args.evaluation}: records no base model; cannot register a usable model")
    model_dir = save_pyfunc(tmp / "model", lora_path, metadata)
    tracker.log_artifacts(model_dir, "model")
    run = client.get_run(tracker.run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/model"
    tags = {
        "pipeline_run_id": args.run_id,
        KEY_TAG: run_key(args.run_id),
        "dataset_sha256": metadata["dataset_sha256"],
        SOURCE_DATASET: metadata[SOURCE_DATASET],
        "run_prefix": metadata["run_prefix"],
        "base_model": metadata["base_model"],
        "base_model_sha256": metadata["base_model_sha256"],
        "tokens": ",".join(metadata["tokens"]),
        "rank": ",".join(str(r) for r in ranks),
        "lora_uri": metadata["lora_uri"],
        "lora_sha256": metadata["lora_sha256"],
        **common.lineage_tags(),
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    mv = client.create_model_version(
        args.model_name, source, run_id=tracker.run_id, tags={k: str(v) for k, v in tags.items() if v is not None}
    )
    # two register attempts racing: keep the oldest version of this run, delete ours if it lost
    first = _existing_version(client, args.model_name, args.run_id)
    if first is not None and first.version != mv.version:
        client.delete_model_version(args.model_name, mv.version)
        return first
    tracker.log_metrics(metrics)
    return client.get_model_version(args.model_name, mv.version)


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
