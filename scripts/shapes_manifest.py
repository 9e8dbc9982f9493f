"""Write `manifest.json` for a shapes-world folder assembled from more than one pretraining run.

    python scripts/shapes_manifest.py DIR --note "what came from where"

Runs the same checks as `lora-ops shapes pretrain` and records every file's size and sha256, the command,
the versions and the note (the provenance of each model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from lora_ops.hashing import sha256_file
    from lora_ops.shapes.evaluator import ShapesEvaluator
    from lora_ops.shapes.pretrain import _versions, check_clip, check_evaluator
    from lora_ops.shapes.quality import base_accuracy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--note", required=True)
    p.add_argument("--from-manifest", action="append", default=[], help="earlier manifests to keep (wall times)")
    args = p.parse_args(argv)
    root = Path(args.dir)
    (root / "manifest.json").unlink(missing_ok=True)
    checks = {
        "evaluator": check_evaluator(ShapesEvaluator.from_pretrained(root / "evaluator"), 200, seed=7),
        "clip": check_clip(root / "clip", 200, seed=8),
        "base": base_accuracy(root / "sd", root / "evaluator", seeds=range(8)),
    }
    earlier = [json.loads(Path(m).read_text()) for m in args.from_manifest]
    files = sorted(f for f in root.rglob("*") if f.is_file())
    manifest = {
        "name": "shapes-world",
        "command": "lora-ops shapes pretrain --out lora_ops/shapes/pretrained",
        "provenance": args.note,
        "versions": _versions(),
        "machine": {"platform": platform.platform()},
        "earlier_runs": [{"wall_seconds": m.get("wall_seconds"), "checks": m.get("checks")} for m in earlier],
        "checks": checks,
        "files": [
            {"path": f.relative_to(root).as_posix(), "size": f.stat().st_size, "sha256": sha256_file(f)} for f in files
        ],  # fmt: skip
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
