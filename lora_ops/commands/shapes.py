"""`lora-ops shapes ...`: the shapes world (pretrain its models, write concept datasets, locate models)."""

from __future__ import annotations

import json
import shlex
import sys

from . import examples


def _pretrain(args) -> int:
    from ..shapes.pretrain import COMPONENTS, PretrainConfig, pretrain

    config = PretrainConfig(
        output_dir=args.out,
        seed=args.seed,
        steps_scale=args.steps_scale,
        latent_pool=args.latent_pool,
        check_images=args.check_images,
        components=tuple(args.only.split(",")) if args.only else COMPONENTS,
        overwrite=args.overwrite,
    )
    command = "lora-ops " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["shapes"] else ""
    out = pretrain(config, command=command)
    from ..shapes import manifest

    m = manifest(out)
    print(json.dumps({"out": str(out), "wall_seconds": m["wall_seconds"], "checks": m["checks"]}, indent=2))
    return 0


def _dataset(args) -> int:
    from ..shapes.world import get_concept, write_concept_dataset

    concept = get_concept(args.concept)
    out = write_concept_dataset(args.concept, args.out, seed=args.seed)
    print(f"{out}: {len(concept.instances)} images of {concept.name!r} with captions")
    print(f"train with placeholder_token_at_data={concept.token_map!r}, initializer_tokens={concept.initializer!r}")
    return 0


def _path(args) -> int:
    from ..shapes import pretrained

    print(pretrained(args.part))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "shapes",
        help="the shapes world: a small pretrained model, its scorers and concepts",
        **examples("lora-ops shapes path sd", "lora-ops shapes dataset ring --out ./ring"),
    )
    s = p.add_subparsers(dest="shapes_command", required=True, metavar="SUBCOMMAND")

    q = s.add_parser(
        "pretrain",
        help="train the base model, VAE, CLIP, DINO slot and evaluator (seeded)",
        **examples(
            "lora-ops shapes pretrain --out ./shapes-smoke --steps-scale 0.01",
            "lora-ops shapes pretrain --out ./shapes",
        ),
    )
    q.add_argument("--out", required=True, help="output folder (sd/, clip/, dino/, evaluator/, manifest.json)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (0.01: smoke run)")
    q.add_argument("--latent-pool", type=int, default=25000, help="renders encoded once for the UNet")
    q.add_argument("--check-images", type=int, default=200, help="images per check after training")
    q.add_argument("--only", default=None,
                   help="comma-separated models to rebuild (evaluator,vae,unet,clip,dino); the rest are kept")  # fmt: skip
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=_pretrain)

    q = s.add_parser(
        "dataset",
        help="write the instance images of a held-out concept (ring, star, striped)",
        **examples(
            "lora-ops shapes dataset ring --out ./ring", "lora-ops shapes dataset striped --out ./striped --seed 1"
        ),
    )
    q.add_argument("concept", help="ring (new subject of the class circle), star (new shape) or striped (style)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_dataset)

    q = s.add_parser(
        "path",
        help="print the folder of a shipped model",
        **examples("lora-ops shapes path", "lora-ops shapes path evaluator"),
    )
    q.add_argument("part", nargs="?", default="sd", choices=["sd", "clip", "dino", "evaluator"])
    q.set_defaults(func=_path)
