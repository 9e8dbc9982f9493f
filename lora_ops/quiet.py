"""Log lines the ML stack prints on every run that need no action, filtered where the project causes them."""

from __future__ import annotations

import logging
import re

# transformers' fallback to its PIL image processors when torchvision is absent is the intended path here
# (torchvision is not a dependency); its warning on every model load says nothing to act on
_KNOWN_NOISE = re.compile(r"requires torchvision \(not installed\); falling back to")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _KNOWN_NOISE.search(record.getMessage())


def quiet_known_warnings() -> None:
    """Filter those lines (logging only: imports nothing). Idempotent."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
        logger.addFilter(_DropKnownNoise())
