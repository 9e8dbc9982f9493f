"""How training images are grouped into batches: aspect-ratio buckets and the batch samplers.

Without buckets every image is trained as a square crop of `resolution`. With buckets (kohya's
`--enable_bucket`) each image is trained at the bucket (h, w) nearest its own aspect ratio, so a portrait
photo keeps its head and feet; buckets hold at most resolution² pixels and their sides are multiples of a step
the UNet can take. A batch then holds images of one bucket only. The samplers draw from their own generator,
and their state resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Buckets:
    """The bucket sizes for one resolution.

    Args:
        resolution: the training resolution; every bucket has at most resolution² pixels.
        step: sides are multiples of this many pixels (kohya's `bucket_reso_steps`; 64 for Stable Diffusion:
            the VAE's factor 8 times the UNet's three halvings).
        min_side, max_side: the shortest and the longest side a bucket may have (kohya's `min_bucket_reso`,
            `max_bucket_reso`); None: half and twice the resolution.
    """

    resolution: int
    step: int = 64
    min_side: int | None = None
    max_side: int | None = None

    def __post_init__(self):
        for name in ("resolution", "step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 8:
                raise ValueError(f"{name}={value!r} must be an integer >= 8")
        lo, hi = self.bounds
        if self.resolution % self.step:
            raise ValueError(f"resolution={self.resolution} must be a multiple of bucket_reso_steps={self.step}")
        if not lo <= self.resolution <= hi:
            raise ValueError(
                f"min_bucket_reso={lo} and max_bucket_reso={hi} must enclose the resolution {self.resolution}"
            )

    @property
    def bounds(self) -> tuple[int, int]:
        """(shortest, longest) side, multiples of the step."""
        lo = self.min_side if self.min_side is not None else self.resolution // 2
        hi = self.max_side if self.max_side is not None else self.resolution * 2
        return max(self.step, lo // self.step * self.step), hi // self.step * self.step

    def sizes(self) -> list[tuple[int, int]]:
        """Every bucket (h, w): for each width, the tallest height within the pixel budget (and its transpose)."""
        lo, hi = self.bounds
        area = self.resolution * self.resolution
        out = {(self.resolution, self.resolution)}
        for w in range(lo, hi + 1, self.step):
            h = min(hi, area // w // self.step * self.step)
            if h >= lo:
                out |= {(h, w), (w, h)}
        return sorted(out)

    def nearest(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket (h, w) whose aspect ratio is nearest that of an image of `size` (h, w); ties: the larger."""
        ratio = math.log(size[0] / size[1])
        return min(self.sizes(), key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


class BatchSampler:
    """Shuffled epochs of indices drawn from its own generator; its state resumes exactly.

    Args:
        n: dataset size.
        batch_size: indices per batch; an epoch's last short batch is completed from the next epoch.
        seed: seed of the shuffling generator.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list = []
        self.pos = 0

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = list(state["order"]), int(state["pos"])


class BucketBatchSampler(BatchSampler):
    """Shuffled epochs of batches whose images share a bucket.

    Each epoch shuffles every bucket's images, cuts them into batches of `batch_size` (a bucket's last short
    batch is completed with its own images drawn again) and shuffles the order of all the batches, so every
    image is seen once per epoch and no batch mixes sizes.

    Args:
        sizes: the training size (h, w) of every image.
        batch_size, seed: as `BatchSampler`.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int):
        super().__init__(len(sizes), batch_size, seed)
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            self.groups.setdefault(tuple(size), []).append(i)

    def _epoch(self) -> list[list[int]]:
        batches = []
        for members in self.groups.values():
            order = [members[i] for i in torch.randperm(len(members), generator=self.generator).tolist()]
            while len(order) % self.batch_size:
                order.append(members[int(torch.randint(len(members), (1,), generator=self.generator))])
            batches += [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]

    def next(self) -> list[int]:
        if self.pos >= len(self.order):
            self.order, self.pos = self._epoch(), 0
        self.pos += 1
        return list(self.order[self.pos - 1])
