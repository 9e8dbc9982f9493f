"""Dataset preprocessing: robust loading, captions, masks, crops, manifest, CLI; tiny random models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lora_ops.captioning import edit_caption
from lora_ops.hashing import sha256_file
from lora_ops.image_files import load_image
from lora_ops.masks import FaceMasker, center_of_mass, square_box
from lora_ops.preprocess import PreprocessConfig, preprocess_dataset
from lora_ops.tiny_vision import make_tiny_captioner, make_tiny_segmenter, make_tiny_upscaler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {
        "captioner": make_tiny_captioner(root / "captioner"),
        "segmenter": make_tiny_segmenter(root / "segmenter"),
        "upscaler": make_tiny_upscaler(root / "upscaler"),
    }


def _noise(h, w, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """Good inputs in every awkward mode: EXIF-rotated JPEG, RGBA, P, CMYK, L, 16-bit, one small."""
    d = tmp_path_factory.mktemp("images")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(_noise(80, 120, seed=1)).save(d / "rotated photo.jpg", exif=exif)
    Image.fromarray(_noise(90, 70, 4, seed=2), "RGBA").save(d / "alpha.png")
    Image.fromarray(_noise(72, 72, seed=3)).convert("P").save(d / "palette.png")
    Image.fromarray(_noise(70, 100, seed=4)).convert("CMYK").save(d / "print.jpg")
    Image.fromarray(_noise(66, 66, 1, seed=5), "L").save(d / "gray.png")
    Image.fromarray((np.random.RandomState(6).rand(64, 80) * 65535).astype(np.uint16)).save(d / "deep.png")
    Image.fromarray(_noise(40, 48, seed=7)).save(d / "small.webp")
    (d / "notes.md").write_text("not an image, ignored")
    return d


NAMES = {"rotated_photo", "alpha", "palette", "print", "gray", "deep", "small"}


def _config(src, out, models, **kw):
    base = dict(
        resolution=64,
        caption_model=str(models["captioner"]),
        caption_prefix="a photo of",
        caption_token="<s1>",
        caption_min_tokens=2,
        caption_max_tokens=8,
        mask="clipseg",
        mask_model=str(models["segmenter"]),
        mask_prompts=("face", "the dog"),
        mask_threshold=0.5,
        upscale_model=str(models["upscaler"]),
        min_size=32,
    )
    base.update(kw)
    return PreprocessConfig(src, out, **base)


@pytest.fixture(scope="module")
def processed(images_dir, vision_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dataset"
    return preprocess_dataset(_config(images_dir, out, vision_models))


def test_load_image_modes_and_exif(images_dir):
    rotated = load_image(images_dir / "rotated photo.jpg")
    assert rotated.mode == "RGB" and rotated.size == (80, 120)  # EXIF orientation 6 applied: 120x80 -> 80x120
    for name in ("alpha.png", "palette.png", "print.jpg", "gray.png", "deep.png", "small.webp"):
        assert load_image(images_dir / name).mode == "RGB"
    deep = np.asarray(load_image(images_dir / "deep.png"))
    assert deep.max() > 200  # 16-bit scaled into 8 bits, not clipped to white or black
    assert len(np.unique(deep)) > 100


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


def test_dataset_layout_and_manifest(processed, vision_models):
    out = processed.output_dir
    assert {item["name"] for item in processed.items} == NAMES
    for name in NAMES:
        image, mask = Image.open(out / f"{name}.png"), Image.open(out / f"{name}.mask.png")
        assert image.mode == "RGB" and image.size == (64, 64)
        assert mask.mode == "L" and mask.size == (64, 64)
        assert set(np.unique(np.asarray(mask))) <= {0, 255}  # threshold given: binary masks
        caption = (out / f"{name}.txt").read_text().strip()
        assert caption.startswith("a photo of <s1>")
    manifest = json.loads(processed.record.read_text())
    assert set(manifest["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {
        "dataset.json"
    }
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / rel)
    assert manifest["models"] == {
        "captioner": str(vision_models["captioner"]),
        "masker": str(vision_models["segmenter"]),
        "upscaler": str(vision_models["upscaler"]),
    }
    assert manifest["parameters"]["resolution"] == 64
    items = {i["name"]: i for i in manifest["items"]}
    assert items["small"]["upscaled"] >= 1 and items["gray"]["upscaled"] == 0  # 40 px < 64 px: Swin2SR ran
    sheet = Image.open(processed.contact_sheet)
    assert sheet.width >= 2 * 128 and sheet.height == 7 * 128  # one row per image: image + mask overlay
    assert not list(out.parent.glob(".dataset.partial-*"))


def test_cli_is_deterministic(processed, images_dir, vision_models, tmp_path):
    out = tmp_path / "again"
    cmd = [sys.executable, "-m", "lora_ops", "preprocess", str(images_dir), str(out), "--resolution", "64"]
    cmd += ["--caption-model", str(vision_models["captioner"]), "--caption-prefix", "a photo of"]
    cmd += ["--caption-token", "<s1>", "--caption-min-tokens", "2", "--caption-max-tokens", "8"]
    cmd += ["--mask-model", str(vision_models["segmenter"]), "--mask-prompt", "face", "--mask-prompt", "the dog"]
    cmd += ["--mask-threshold", "0.5", "--upscale-model", str(vision_models["upscaler"]), "--min-size", "32"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["images"] == 7 and summary["skipped"] == []
    first = json.loads(processed.record.read_text())["files"]
    second = json.loads((out / "dataset.json").read_text())["files"]
    assert first == second  # same bytes for every image, mask, caption and the contact sheet


def test_bad_inputs_are_listed_in_one_error(images_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.open(images_dir / "gray.png").save(src / "good.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.fromarray(_noise(8, 8)).save(src / "tiny.png")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"2 bad input.*broken\.jpg.*tiny\.png"):
        preprocess_dataset(PreprocessConfig(src, out, resolution=64, caption_model=None, mask="none"))
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))  # nothing half-written

    with pytest.warns(UserWarning, match="broken.jpg"):
        result = preprocess_dataset(
            PreprocessConfig(src, out, resolution=64, caption_model=None, mask="none", on_error="skip")
        )
    assert [i["name"] for i in result.items] == ["good"]
    assert sorted(s["file"] for s in json.loads(result.record.read_text())["skipped"]) == ["broken.jpg", "tiny.png"]
    assert (out / "good.txt").read_text().strip() == "good"  # no captioner: the file name
    assert np.asarray(Image.open(out / "good.mask.png")).min() == 255


def test_output_folder_is_not_clobbered(images_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    cfg = dict(resolution=32, caption_model=None, mask="none", min_size=32)
    with pytest.raises(ValueError, match="not empty"):
        preprocess_dataset(PreprocessConfig(images_dir, out, **cfg))
    # --overwrite replaces only a folder lora-ops wrote: a user's folder is refused and kept
    with pytest.raises(ValueError, match="replaces only a folder lora-ops wrote"):
        preprocess_dataset(PreprocessConfig(images_dir, out, overwrite=True, **cfg))
    assert (out / "keep.txt").read_text() == "user data"
    fresh = tmp_path / "fresh"
    preprocess_dataset(PreprocessConfig(images_dir, fresh, **cfg))
    again = preprocess_dataset(PreprocessConfig(images_dir, fresh, overwrite=True, **cfg))
    assert len(again.items) == len(NAMES) and again.record.is_file()
    # a file the user added to an earlier output is never deleted by --overwrite
    (fresh / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"did not write \(\['notes.md'\]\)"):
        preprocess_dataset(PreprocessConfig(images_dir, fresh, overwrite=True, **cfg))
    assert (fresh / "notes.md").read_text() == "mine" and again.record.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.mark.parametrize("layout", ["out-contains-input", "out-inside-input", "same"])
def test_output_overlapping_the_input_is_refused(images_dir, tmp_path, layout):
    parent = tmp_path / "p"
    raw = parent / "in"
    shutil.copytree(images_dir, raw)
    (parent / "unrelated.txt").write_text("keep me")
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    out = {"out-contains-input": parent, "out-inside-input": raw / "out", "same": raw}[layout]
    cfg = dict(resolution=32, caption_model=None, mask="none", min_size=32)
    with pytest.raises(ValueError, match="overlaps the input input_dir"):
        preprocess_dataset(PreprocessConfig(raw, out, overwrite=True, **cfg))
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    assert after == before


def test_caption_file_that_is_not_utf8_is_named_before_models_load(images_dir, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(images_dir, raw)
    bad = sorted(raw.glob("*.png"))[0].with_suffix(".txt")
    bad.write_bytes(b"a caf\xe9 photo")
    # the caption model does not exist: the error must come from the caption file, before any model loads
    cfg = dict(resolution=32, caption_model=None, mask="clipseg", mask_model="nobody/no-such-model", min_size=32)
    with pytest.raises(ValueError, match=rf"{bad.name}: caption file is not UTF-8"):
        preprocess_dataset(PreprocessConfig(raw, tmp_path / "out", **cfg))
    assert not (tmp_path / "out").exists()


def test_face_masks_fall_back_to_whole_image(images_dir, tmp_path):
    masker = FaceMasker()
    noise = Image.fromarray(_noise(96, 96, seed=9))
    assert masker.boxes(noise) == []
    with pytest.warns(UserWarning, match="empty face mask"):
        result = preprocess_dataset(
            PreprocessConfig(
                images_dir, tmp_path / "faces", resolution=32, caption_model=None, mask="face", min_size=32
            )
        )
    assert all(item.get("mask_empty") for item in result.items)
    assert json.loads(result.record.read_text())["models"]["masker"].startswith("opencv:")


def test_crop_follows_the_mask():
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (170, 40, 190, 60))  # subject near the right edge
    cx, cy = center_of_mass(mask)
    assert cx == pytest.approx(180) and cy == pytest.approx(50)
    assert square_box((200, 100), (cx, cy)) == (100, 0, 200, 100)  # clamped inside the image
    assert square_box((200, 100), center_of_mass(Image.new("L", (200, 100), 0))) == (50, 0, 150, 100)
    assert square_box((60, 120), (30, 0)) == (0, 0, 60, 60)


def test_edit_caption():
    assert edit_caption("a man with a hat", "a photo of", "<s1>", ("a man",)) == "a photo of <s1> with a hat"
    assert edit_caption("A Man in the snow", token="<s1>", substitute=("man",)) == "A <s1> in the snow"
    assert edit_caption("a dog", token="<s1>", substitute=("cat",)) == "<s1>, a dog"
    assert edit_caption("a dog", prefix="style of <s2>,") == "style of <s2>, a dog"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resolution": 60}, "resolution=60"),
        ({"mask": "sam"}, "mask='sam'"),
        ({"crop": "face"}, "crop='face'"),
        ({"mask_threshold": 1.5}, "mask_threshold=1.5"),
        ({"caption_substitute": ("a man",)}, "caption_token"),
        ({"caption_model": "not a model"}, "caption_model='not a model'"),
    ],
)
def test_bad_config_names_the_argument(images_dir, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocess_dataset(PreprocessConfig(images_dir, tmp_path / "o", **{"mask": "none", **kwargs}))
    assert not (tmp_path / "o").exists()


def _drawn_face(size: int) -> Image.Image:
    """A cartoon face (skin ellipse, eyes, brows, nose, mouth) that the frontal-face cascade detects."""
    from PIL import ImageDraw, ImageFilter

    s = size / 200
    image = Image.new("RGB", (size, size), (40, 60, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse((50 * s, 30 * s, 150 * s, 170 * s), fill=(225, 185, 160))
    for x in (75, 125):
        draw.ellipse(((x - 12) * s, 75 * s, (x + 12) * s, 90 * s), fill=(255, 255, 255))
        draw.ellipse(((x - 6) * s, 77 * s, (x + 6) * s, 89 * s), fill=(30, 20, 20))
        draw.rectangle(((x - 16) * s, 62 * s, (x + 16) * s, 67 * s), fill=(70, 50, 40))
    draw.polygon([(100 * s, 90 * s), (92 * s, 122 * s), (108 * s, 122 * s)], fill=(200, 150, 130))
    draw.ellipse((80 * s, 135 * s, 120 * s, 148 * s), fill=(150, 60, 60))
    return image.filter(ImageFilter.GaussianBlur(2))


def test_face_mask_centers_the_crop_on_the_face(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    canvas = Image.new("RGB", (400, 200), (40, 60, 40))
    canvas.paste(_drawn_face(200), (200, 0))  # the face in the right half
    canvas.save(src / "portrait.png")
    mask = FaceMasker()(load_image(src / "portrait.png"))
    weights = np.asarray(mask)
    assert weights[:, 200:].sum() > 0 and weights[:, :150].sum() == 0
    result = preprocess_dataset(PreprocessConfig(src, tmp_path / "out", resolution=64, caption_model=None, mask="face"))
    left = result.items[0]["crop_box"][0]
    assert left >= 180  # centered crop would start at 100
    assert "mask_empty" not in result.items[0]


def test_clipseg_soft_and_binary_masks(vision_models):
    from lora_ops.masks import ClipSegMasker

    image = Image.fromarray(_noise(50, 70, seed=11))
    soft = np.asarray(ClipSegMasker(vision_models["segmenter"], ["face"])(image))
    assert soft.shape == (50, 70) and soft.max() >= 240 and len(np.unique(soft)) > 2  # max 255 before resizing
    sharp = np.asarray(ClipSegMasker(vision_models["segmenter"], ["face"], temperature=0.25)(image))
    assert not np.array_equal(soft, sharp)  # the temperature reshapes the probabilities
    binary = np.asarray(ClipSegMasker(vision_models["segmenter"], ["face", "dog"], threshold=0.5)(image))
    assert set(np.unique(binary)) <= {0, 255}


def test_upscaler_doubles_the_size(vision_models):
    from lora_ops.preprocess import Upscaler

    upscaler = Upscaler(vision_models["upscaler"])
    out = upscaler(Image.fromarray(_noise(21, 30, seed=12)))  # odd sizes: padded inside, cropped back
    assert out.mode == "RGB" and out.size == (60, 42)
