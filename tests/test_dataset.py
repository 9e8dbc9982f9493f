"""Datasets: folder scanning, robust image decoding, prompts, augmentation, inpainting masks, sampling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lora_ops.batching import BatchSampler
from lora_ops.dataset import (
    DatasetConfig,
    ImageDataset,
    caption_from_filename,
    random_inpaint_mask,
    scan_folder,
)
from lora_ops.image_files import load_image


def solid(path, color=(200, 30, 30), size=(40, 40), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def test_scan_folder_pairs_captions_and_masks(tmp_path):
    solid(tmp_path / "b.jpg")
    solid(tmp_path / "a.png")
    solid(tmp_path / "c.webp")
    (tmp_path / "a.txt").write_text("  a photo of person  \n")
    solid(tmp_path / "a.mask.png", 255, mode="L")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    examples = scan_folder(tmp_path)
    assert [e.image.name for e in examples] == ["a.png", "b.jpg", "c.webp"]
    assert examples[0].caption == "a photo of person" and examples[0].mask.name == "a.mask.png"
    assert examples[1].caption is None and examples[1].mask is None


def test_bad_files_listed_in_one_error_or_skipped(tmp_path):
    solid(tmp_path / "good.png")
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    solid(tmp_path / "anim.gif")
    with pytest.raises(ValueError) as err:
        scan_folder(tmp_path)
    message = str(err.value)
    assert "3 file(s)" in message and "notes.md" in message and "broken.jpg" in message and "anim.gif" in message
    with pytest.warns(UserWarning, match="skipped"):
        examples = scan_folder(tmp_path, on_bad_files="skip")
    assert [e.image.name for e in examples] == ["good.png"]


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        scan_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        scan_folder(tmp_path / "nope")


def test_modes_convert_to_rgb_correctly(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").getpixel((1, 1)) == (255, 255, 255)
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 0, 0)
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((0, 0))
    assert r > 240 and g < 15 and b < 15
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "i16half.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert load_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "i16half.png").getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_prompts_templates_token_map_and_filenames(tmp_path):
    solid(tmp_path / "a-man_on the beach (2).png")
    solid(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a person smiling")
    assert caption_from_filename(tmp_path / "a-man_on the beach (2).png") == "a man on the beach"
    mapped = ImageDataset(DatasetConfig(tmp_path, resolution=32, token_map="person|<s1><s2>"))
    assert mapped.prompts == ["a man on the beach", "a <s1><s2> smiling"]
    styled = ImageDataset(DatasetConfig(tmp_path, resolution=32, placeholder_tokens=["<s1>", "<s2>"], template="style"))
    g = torch.Generator().manual_seed(0)
    prompts = {styled.prompt(0, g) for _ in range(30)}
    assert len(prompts) > 3 and all("style of <s1><s2>" in p for p in prompts)
    user = ImageDataset(DatasetConfig(tmp_path, resolution=32, placeholder_tokens=["<x>"], template=["{} art"]))
    assert user.prompt(1) == "<x> art" and user.all_prompts() == ["<x> art"]
    with pytest.raises(ValueError, match="template"):
        DatasetConfig(tmp_path, template="portrait", placeholder_tokens=["<x>"])
    with pytest.raises(ValueError, match="placeholder_token_at_data"):
        DatasetConfig(tmp_path, token_map="person")


def test_augmentation_is_switchable_and_reproducible(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = 255  # left half white
    Image.fromarray(arr).save(tmp_path / "x.png")
    plain = ImageDataset(DatasetConfig(tmp_path, resolution=32))
    assert not plain.config.augments
    s = plain.sample(0)["pixel_values"]
    assert s.shape == (3, 32, 32) and s.min() >= -1 and s.max() <= 1
    assert torch.equal(s, plain.sample(0, torch.Generator().manual_seed(5))["pixel_values"])  # deterministic
    aug = ImageDataset(DatasetConfig(tmp_path, resolution=32, crop="random", flip=True, color_jitter=True))
    assert aug.config.augments
    one = aug.sample(0, torch.Generator().manual_seed(1))["pixel_values"]
    assert torch.equal(one, aug.sample(0, torch.Generator().manual_seed(1))["pixel_values"])
    draws = [aug.sample(0, torch.Generator().manual_seed(k))["pixel_values"] for k in range(12)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # flipping moves the white half from left to right
    flips = ImageDataset(DatasetConfig(tmp_path, resolution=32, flip=True))
    lefts = {
        float(flips.sample(0, torch.Generator().manual_seed(k))["pixel_values"][:, :, 0].mean()) for k in range(12)
    }
    assert max(lefts) > 0.9 and min(lefts) < -0.9


def test_small_images_upscaled_with_warning_and_masks(tmp_path):
    solid(tmp_path / "tiny.png", size=(16, 12))
    mask = np.zeros((12, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "tiny.mask.png")
    with pytest.warns(UserWarning, match="upscaled: tiny.png 16x12"):
        ds = ImageDataset(DatasetConfig(tmp_path, resolution=32, use_masks=True))
    sample = ds.sample(0)
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)
    assert sample["mask"][0, :, -1].min() == 1 and sample["mask"][0, :, 0].max() == 0
    solid(tmp_path / "other.png", size=(32, 32))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="other.png"):
        warnings.simplefilter("ignore")
        ImageDataset(DatasetConfig(tmp_path, resolution=32, use_masks=True))


def test_inpainting_masks_and_masked_images(tmp_path):
    solid(tmp_path / "x.png", size=(32, 32))
    ds = ImageDataset(DatasetConfig(tmp_path, resolution=32, inpainting=True))
    fractions = []
    for k in range(20):
        s = ds.sample(0, torch.Generator().manual_seed(k))
        hole = s["inpaint_mask"]
        assert hole.shape == (1, 32, 32) and set(hole.unique().tolist()) <= {0.0, 1.0}
        assert torch.all(s["masked_image"][:, hole[0] > 0.5] == 0)
        assert torch.equal(s["masked_image"][:, hole[0] < 0.5], s["pixel_values"][:, hole[0] < 0.5])
        fractions.append(float(hole.mean()))
    assert min(fractions) < 1.0 and max(fractions) == 1.0  # holes, and sometimes the whole canvas
    assert torch.equal(
        random_inpaint_mask(32, torch.Generator().manual_seed(3)),
        random_inpaint_mask(32, torch.Generator().manual_seed(3)),
    )


def test_batch_sampler_covers_epochs_and_resumes():
    sampler = BatchSampler(5, 2, seed=0)
    first = [sampler.next() for _ in range(5)]  # 10 indices = 2 epochs
    flat = [i for b in first for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
    state = sampler.state_dict()
    after = [sampler.next() for _ in range(4)]
    again = BatchSampler(5, 2, seed=99)
    again.load_state_dict(state)
    assert [again.next() for _ in range(4)] == after


def test_caption_that_is_not_utf8_is_named(tmp_path):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a red square", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"a gr\xfcn square")  # Latin-1
    with pytest.raises(ValueError, match=r"b\.txt: caption file is not UTF-8 text"):
        scan_folder(tmp_path)
    with pytest.warns(UserWarning, match="b.txt"):
        examples = scan_folder(tmp_path, on_bad_files="skip")
    assert [e.caption for e in examples] == ["a red square"]
