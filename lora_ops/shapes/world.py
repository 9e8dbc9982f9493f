"""The shapes world: a seeded renderer of small images of coloured shapes, and its captions.

Every image is one shape of one colour, at a random size and position, on a plain light or dark
background, drawn at 4x and downsampled (antialiased). A `Spec` says what is drawn; `render(spec, rng)`
draws it; `caption(spec)` is "a red circle" ("a red circle in the style of stripes" for the striped style).

Known concepts (the base model is pretrained on them): `SHAPES` x `COLOURS`, filled. Held-out concepts
(never shown to the base UNet and text encoder; the VAE and the scorers see everything, as a real VAE and
CLIP know the world), each the situation of one kind of fine-tuning:

- "ring": a new subject of a known class (a specific dog of the class "dog"): a thick ring, learned as
  "a <s1> circle" from a few images in two colours only;
- "star": a new shape, learned as "a <s1>";
- "striped": a style, learned as "... in the style of <s1>".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # pixels; the VAE halves it to 16x16 latents
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
NEW_SHAPES: tuple[str, ...] = ("ring", "star")
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 50, 190),
}
STYLES: tuple[str, ...] = ("filled", "striped")
STRIPE_PERIOD = 6  # pixels at SIZE; 3 on, 3 off, diagonal


@dataclass(frozen=True)
class Spec:
    """What one image shows: a shape in a colour and a style."""

    shape: str
    colour: str
    style: str = "filled"

    def __post_init__(self):
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"shape={self.shape!r} is not one of {ALL_SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour={self.colour!r} is not one of {tuple(COLOURS)}")
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r} is not one of {STYLES}")


def known_specs() -> list[Spec]:
    """Every known concept (what the base model is pretrained on): 5 shapes x 5 colours, filled."""
    return [Spec(s, c) for s in SHAPES for c in COLOURS]


def all_specs() -> list[Spec]:
    """Every concept the world can draw (what the VAE and the scorers are trained on)."""
    return [Spec(s, c, st) for s in ALL_SHAPES for c in COLOURS for st in STYLES]


def caption(spec: Spec) -> str:
    """'a red circle'; 'a red circle in the style of stripes' for the striped style."""
    text = f"a {spec.colour} {spec.shape}"
    return text + " in the style of stripes" if spec.style == "striped" else text


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        a, b = r, r * 0.36
        pts = [
            (b, a),
            (b, b),
            (a, b),
            (a, -b),
            (b, -b),
            (b, -a),
            (-b, -a),
            (-b, -b),
            (-a, -b),
            (-a, b),
            (-b, b),
            (-b, a),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    return None  # circle, ring: ellipses


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    """An 'L' mask (255 inside) of `shape` at (cx, cy) with radius r, in pixels of a `size` canvas."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    poly = _polygon(shape, cx, cy, r)
    if poly is not None:
        draw.polygon(poly, fill=255)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            inner = r * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    return mask


def _stripes(size: int, period: float, phase: float) -> Image.Image:
    """An 'L' mask of diagonal stripes (255 on), `period` pixels, shifted by `phase` in [0, 1)."""
    yy, xx = np.mgrid[0:size, 0:size]
    on = ((xx + yy) / period + phase) % 1.0 < 0.5
    return Image.fromarray((on * 255).astype(np.uint8), "L")


def render(spec: Spec, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """One RGB image of `spec`; every random choice (size, position, shades, background) comes from rng."""
    big = size * SUPERSAMPLE
    light = rng.random() < 0.5
    grey = rng.integers(205, 246) if light else rng.integers(15, 56)
    bg = tuple(int(np.clip(grey + rng.integers(-8, 9), 0, 255)) for _ in range(3))
    colour = tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in COLOURS[spec.colour])
    r = rng.uniform(0.25, 0.40) * size
    margin = r + 1.0
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    s = SUPERSAMPLE
    mask = _shape_mask(spec.shape, cx * s, cy * s, r * s, big)
    if spec.style == "striped":
        stripes = _stripes(big, STRIPE_PERIOD * s, float(rng.random()))
        mask = Image.fromarray((np.asarray(mask) & np.asarray(stripes)).astype(np.uint8), "L")
    canvas = Image.new("RGB", (big, big), bg)
    canvas.paste(Image.new("RGB", (big, big), colour), (0, 0), mask)
    return canvas.resize((size, size), Image.Resampling.BOX)


def render_none(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """An image that shows no single shape of the world: noise, blobs, blanks, pieces, several shapes.

    The evaluator's "none of these" class is trained on these, so it does not call garbage a shape.
    """
    kind = int(rng.integers(0, 6))
    if kind == 0:  # noise (what a broken model draws)
        arr = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
        img = Image.fromarray(arr)
        blur = float(rng.uniform(0, 2.5))
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(blur)) if blur > 0.3 else img
    if kind == 1:  # a blank background, maybe with a gradient
        grey = float(rng.integers(0, 256))
        ramp = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(0, 60)
        arr = np.clip(grey + ramp + np.zeros((size, size, 3)) + rng.normal(0, 4, (1, 1, 3)), 0, 255)
        return Image.fromarray(arr.astype(np.uint8))
    if kind == 2:  # two shapes at once
        a = render(Spec(str(rng.choice(ALL_SHAPES)), str(rng.choice(list(COLOURS)))), rng, size)
        b = render(Spec(str(rng.choice(ALL_SHAPES)), str(rng.choice(list(COLOURS)))), rng, size)
        arr = np.asarray(a).copy()
        arr[:, size // 2 :] = np.asarray(b)[:, size // 2 :]
        return Image.fromarray(arr)
    if kind == 3:  # a shape cut off: a piece at an edge
        img = render(Spec(str(rng.choice(ALL_SHAPES)), str(rng.choice(list(COLOURS)))), rng, size)
        dx, dy = (int(v) for v in rng.integers(-size // 2, size // 2 + 1, 2))
        arr = np.roll(np.asarray(img), (dy + size // 2 * int(np.sign(dy or 1)), dx), axis=(0, 1))
        return Image.fromarray(arr)
    if kind == 4:  # irregular blobs of several colours
        big = size * SUPERSAMPLE
        canvas = Image.new("RGB", (big, big), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 9))):
            pts = [tuple(float(v) for v in rng.uniform(0, big, 2)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        return canvas.resize((size, size), Image.Resampling.BOX)
    # a heavily blurred shape: a smudge of colour, no recognisable outline
    from PIL import ImageFilter

    img = render(Spec(str(rng.choice(ALL_SHAPES)), str(rng.choice(list(COLOURS)))), rng, size)
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(3.0, 6.0))))


# ---- held-out concepts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """A held-out concept and how a user would fine-tune on it.

    Args:
        name: "ring", "star" or "striped".
        kind: "subject" (a new instance of a known class), "shape" (a new class) or "style".
        instances: the specs of the instance images (a few colours only, so that prompting another colour
            tests recontextualisation).
        caption_word: the word of the instance captions that the learned token replaces
            (`placeholder_token_at_data` = "<caption_word>|<replacement>").
        replacement: what it becomes, with "{token}" for the learned token.
        prompt: the evaluation template, "{colour}" and "{token}" filled in ("a {colour} {token} circle").
        class_word: what "{token}" becomes for the base model and the CLIP-T text (the DreamBooth
            convention: "a red circle" for the ring, "" being the class word's absence).
        name_prompt: the template with the concept's own name ("a {colour} ring"), which the base never saw.
        initializer: the known word the token starts from (pivotal tuning).
        target: what the evaluator must see: ("shape", name) or ("style", name).
    """

    name: str
    kind: str
    instances: tuple[Spec, ...]
    caption_word: str
    replacement: str
    prompt: str
    class_word: str
    initializer: str
    target: tuple[str, str]
    name_prompt: str

    def prompt_for(self, colour: str, token: str) -> str:
        return " ".join(self.prompt.format(colour=colour, token=token).split())

    def text_for(self, colour: str) -> str:
        """The prompt with the class word for the token (the base model's prompt, CLIP-T's text)."""
        return self.prompt_for(colour, self.class_word)

    def name_prompt_for(self, colour: str) -> str:
        return self.name_prompt.format(colour=colour)

    def token_map_for(self, token: str) -> str:
        """`placeholder_token_at_data` for `token`: "ring|<s1> circle"."""
        return f"{self.caption_word}|{self.replacement.format(token=token)}"

    @property
    def token_map(self) -> str:
        return self.token_map_for("<s1>")


CONCEPTS: dict[str, Concept] = {
    "ring": Concept(
        name="ring",
        kind="subject",
        instances=tuple(Spec("ring", c) for c in ("red", "blue", "red", "blue", "red", "blue")),
        caption_word="ring",
        replacement="{token} circle",
        prompt="a {colour} {token} circle",
        class_word="",
        initializer="circle",
        target=("shape", "ring"),
        name_prompt="a {colour} ring",
    ),
    "star": Concept(
        name="star",
        kind="shape",
        instances=tuple(Spec("star", c) for c in ("red", "green", "blue", "red", "green", "blue")),
        caption_word="star",
        replacement="{token}",
        prompt="a {colour} {token}",
        class_word="star",
        initializer="diamond",
        target=("shape", "star"),
        name_prompt="a {colour} star",
    ),
    "striped": Concept(
        name="striped",
        kind="style",
        instances=(
            Spec("circle", "red", "striped"),
            Spec("square", "blue", "striped"),
            Spec("triangle", "green", "striped"),
            Spec("diamond", "yellow", "striped"),
            Spec("cross", "red", "striped"),
            Spec("square", "green", "striped"),
        ),
        caption_word="stripes",
        replacement="{token}",
        prompt="a {colour} square in the style of {token}",
        class_word="stripes",
        initializer="square",
        target=("style", "striped"),
        name_prompt="a {colour} square in the style of stripes",
    ),
}


def get_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise ValueError(f"concept={name!r} is not one of {tuple(CONCEPTS)}")
    return CONCEPTS[name]


def write_images(specs: Sequence[Spec], directory: str | Path, seed: int, prefix: str = "img") -> Path:
    """Render `specs` into `directory` as `<prefix>_NN.png` with `<prefix>_NN.txt` captions."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, spec in enumerate(specs):
        render(spec, rng).save(directory / f"{prefix}_{i:02d}.png")
        (directory / f"{prefix}_{i:02d}.txt").write_text(caption(spec) + "\n")
    return directory


def write_concept_dataset(name: str, directory: str | Path, seed: int = 0) -> Path:
    """The instance images of the held-out concept `name` (with captions) in `directory`."""
    concept = get_concept(name)
    return write_images(concept.instances, directory, seed=seed + 1000, prefix=concept.name)


def write_prior_dataset(directory: str | Path, per_concept: int = 2, seed: int = 0) -> Path:
    """Regularization images for fine-tuning: every known concept `per_concept` times, with captions (what
    the model must keep drawing while it learns a held-out concept; PTIConfig.prior_data_dir)."""
    return write_images(known_specs() * per_concept, directory, seed=seed + 2000, prefix="prior")
