"""The `lora-registry` console script: checks that the pipeline extra is installed before importing MLflow."""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    missing = [name for name in ("mlflow", "minio") if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"lora-registry: needs {', '.join(missing)}, which come with the pipeline extra: "
            "pip install 'lora-pipeline[pipeline]'",
            file=sys.stderr,
        )
        return 2
    from .serving import main as registry_main

    return registry_main(argv)


if __name__ == "__main__":
    sys.exit(main())
