"""Aspect-ratio bucketing: the bucket sizes, images trained at their own aspect ratio, batches of one bucket,
prior preservation across buckets, exact resume, and the options' errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import assert_resume_is_exact, dreambooth_config, random_images

from lora_ops.batching import BucketBatchSampler, Buckets
from lora_ops.cli import main as cli
from lora_ops.dataset import DatasetConfig, ImageDataset
from lora_ops.lora_file import read_safetensors
from lora_ops.training.batches import Source, build_batch
from lora_ops.training.dreambooth import train_dreambooth
from lora_ops.training.trainee import load_trainee, sdxl_time_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bucket_sizes_keep_the_pixel_budget_and_the_step():
    buckets = Buckets(512)
    sizes = buckets.sizes()
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for h, w in sizes:
        assert h * w <= 512 * 512 and h % 64 == 0 and w % 64 == 0 and min(h, w) >= 256 and max(h, w) <= 1024
    assert buckets.nearest((1080, 1920)) == (384, 640)  # 16:9 landscape
    assert buckets.nearest((1920, 1080)) == (640, 384)
    assert buckets.nearest((700, 700)) == (512, 512)
    assert Buckets(512, min_side=448, max_side=576).sizes() == [(448, 576), (512, 512), (576, 448)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(resolution=500), "resolution=500 must be a multiple of bucket_reso_steps=64"),
        (dict(resolution=512, step=4), "step=4 must be an integer >= 8"),
        (dict(resolution=512, min_side=640), "min_bucket_reso=640 and max_bucket_reso=1024 must enclose"),
    ],
)
def test_bucket_layouts_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Buckets(**kwargs)


def test_each_image_is_trained_at_its_own_aspect_ratio(tmp_path):
    data = random_images(tmp_path / "d", [(48, 96), (96, 48), (64, 64), (50, 101)])
    buckets = Buckets(32, step=8)
    ds = ImageDataset(DatasetConfig(data, 32, prompt="x", buckets=buckets))
    assert ds.sizes == [(24, 40), (40, 24), (32, 32), (24, 40)]
    for i, (h, w) in enumerate(ds.sizes):
        sample = ds.sample(i, torch.Generator().manual_seed(0))
        assert sample["pixel_values"].shape == (3, h, w)
        assert sample["original_size"].tolist() == list(Image.open(data / f"img{i}.png").size[::-1])
    # the whole landscape image is in the sample (resized to cover its bucket, the 2:1 image loses 1/6 of its
    # width), where a square crop would keep only its middle half
    image = np.asarray(Image.open(data / "img0.png").resize((48, 24), Image.Resampling.BICUBIC), dtype=np.float32)
    sample = ds.sample(0, torch.Generator().manual_seed(0))["pixel_values"].permute(1, 2, 0).numpy()
    np.testing.assert_allclose((sample + 1) * 127.5, image[:, 4:44], atol=1.0)
    # without buckets: the square crop, as before
    square = ImageDataset(DatasetConfig(data, 32, prompt="x"))
    assert square.sizes == [(32, 32)] * 4 and square.sample(0)["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="buckets are for resolution 32, the dataset's is 64"):
        DatasetConfig(data, 64, buckets=buckets)


def test_bucket_batches_hold_one_size_cover_every_image_and_resume():
    sizes = [(24, 40)] * 3 + [(40, 24)] * 2 + [(32, 32)]
    sampler = BucketBatchSampler(sizes, 2, seed=0)
    epoch = [sampler.next() for _ in range(4)]  # 2 + 1 + 1 batches: one epoch
    for batch in epoch:
        assert len(batch) == 2 and len({sizes[i] for i in batch}) == 1
    assert set(i for b in epoch for i in b) == set(range(6))
    state = sampler.state_dict()
    after = [sampler.next() for _ in range(7)]
    again = BucketBatchSampler(sizes, 2, seed=123)
    again.load_state_dict(state)
    assert [again.next() for _ in range(7)] == after


def _config(model, data, out, **kw):
    bucketing = {"max_train_steps": 4, "save_steps": 2, "enable_bucket": True, "bucket_reso_steps": 8}
    return dreambooth_config(model, data, out, **{**bucketing, **kw})


def test_instance_and_prior_batches_of_different_buckets_train_together(tiny_sdxl_model, tmp_path):
    data = random_images(tmp_path / "inst", [(48, 96), (50, 100)])  # landscape
    classes = random_images(tmp_path / "cls", [(96, 48), (100, 50)], seed=2)  # portrait
    config = _config(tiny_sdxl_model, data, tmp_path / "out", train_batch_size=2)
    trainee = load_trainee(config)
    dataset_config = dict(resolution=32, buckets=config.data.buckets())
    sources = [
        Source(ImageDataset(DatasetConfig(data, prompt="a photo of sks dog", **dataset_config)), 1.0),
        Source(ImageDataset(DatasetConfig(classes, prompt="a photo of dog", **dataset_config)), 0.5),
    ]
    for k, source in enumerate(sources):
        source.sampler = source.dataset.batch_sampler(2, k)
    wide, tall = build_batch(trainee, sources, 2, torch.Generator(), torch.Generator())
    f = 2 ** (len(trainee.vae.config.block_out_channels) - 1)
    assert wide["latents"].shape[-2:] == (24 // f, 40 // f) and tall["latents"].shape[-2:] == (40 // f, 24 // f)
    assert wide["sample_weights"].tolist() == [0.5, 0.5] and tall["sample_weights"].tolist() == [0.25, 0.25]
    # SDXL's target size is the bucket's
    assert (
        wide["time_ids"][:, 4:].tolist() == [[24.0, 40.0]] * 2
        and tall["time_ids"][:, 4:].tolist() == [[40.0, 24.0]] * 2
    )

    # a full DreamBooth run with prior preservation across buckets, and its exact resume
    kw = dict(with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a photo of dog")
    kw |= dict(num_class_images=2, train_batch_size=2, gradient_accumulation_steps=2)
    tensors = assert_resume_is_exact(lambda out, **more: _config(tiny_sdxl_model, data, out, **kw, **more), tmp_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_bucketing_is_the_same_gradient_as_one_batch_per_size(tiny_model, tmp_path):
    """Accumulating two buckets as batches or in a loop gives the same LoRA (the sizes never mix)."""
    data = random_images(tmp_path / "d", [(48, 96), (96, 48), (50, 100), (100, 50)])
    kw = dict(train_batch_size=1, gradient_accumulation_steps=4, max_train_steps=2, save_steps=1000)
    batch = train_dreambooth(_config(tiny_model, data, tmp_path / "b", accumulation="batch", **kw))
    loop = train_dreambooth(_config(tiny_model, data, tmp_path / "l", accumulation="loop", **kw))
    a, b = read_safetensors(batch.path)[0], read_safetensors(loop.path)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)


def test_bucket_options_are_checked_against_the_model(tiny_model, tmp_path):
    data = random_images(tmp_path / "d", [(48, 96)])
    with pytest.raises(ValueError, match="resolution=36 must be a multiple of bucket_reso_steps=8"):
        _config(tiny_model, data, tmp_path / "o", resolution=36)
    with pytest.raises(ValueError, match="bucket_reso_steps=4 must be an integer >= 8"):
        _config(tiny_model, data, tmp_path / "o", bucket_reso_steps=4)
    # the tiny UNet halves once after the VAE's factor 2: bucket sides must be multiples of 4
    with pytest.raises(ValueError, match=r"bucket_reso_steps=10 must be a multiple of 4 for this model \(the VAE"):
        load_trainee(_config(tiny_model, data, tmp_path / "o", resolution=40, bucket_reso_steps=10))


def test_cli_trains_with_buckets(tiny_model, tmp_path):
    data = random_images(tmp_path / "d", [(48, 96), (96, 48)])
    out = tmp_path / "out"
    args = ["train", "dreambooth", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir"]
    args += [str(data), "--output_dir", str(out), "--instance_prompt", "a photo of sks dog", "--resolution", "32"]
    args += ["--max_train_steps", "2", "--enable_bucket", "--bucket_reso_steps", "8", "--progress", "false"]
    assert cli(args) == 0
    assert (out / "final_lora.safetensors").is_file()


def test_sdxl_time_ids_of_a_bucket_batch():
    batch = {
        "pixel_values": torch.zeros(2, 3, 24, 40),
        "original_size": torch.tensor([[48, 96], [50, 100]]),
        "crop_top_left": torch.tensor([[0, 4], [0, 3]]),
    }
    assert sdxl_time_ids(batch).tolist() == [[48, 96, 0, 4, 24, 40], [50, 100, 0, 3, 24, 40]]


def test_bucketing_is_on_by_default_for_sdxl_and_off_for_sd1(tiny_model, tiny_sdxl_model, tmp_path, monkeypatch):
    data = random_images(tmp_path / "d", [(48, 96)])
    sd1 = dreambooth_config(tiny_model, data, tmp_path / "o")
    xl = dreambooth_config(tiny_sdxl_model, data, tmp_path / "o", bucket_reso_steps=8)
    assert sd1.data.enable_bucket is None and sd1.data.buckets(sdxl=False) is None
    assert xl.data.buckets(sdxl=True) == Buckets(32, step=8)
    assert load_trainee(xl).sdxl and load_trainee(sd1) is not None
    off = dreambooth_config(tiny_sdxl_model, data, tmp_path / "o", enable_bucket=False)
    assert off.data.buckets(sdxl=True) is None
    # the default step (64) does not divide 32 px: the error says that bucketing is on by default and how to
    # turn it off
    with pytest.raises(ValueError, match="on by default for SDXL bases: set bucket_reso_steps, or enable_bucket false"):
        load_trainee(dreambooth_config(tiny_sdxl_model, data, tmp_path / "o"))
    import lora_ops.training.dreambooth as trainer

    seen = []

    class Recording(ImageDataset):
        def __init__(self, config):
            super().__init__(config)
            seen.append(self.sizes)

    monkeypatch.setattr(trainer, "ImageDataset", Recording)
    train_dreambooth(dreambooth_config(tiny_sdxl_model, data, tmp_path / "xl", bucket_reso_steps=8))
    train_dreambooth(dreambooth_config(tiny_model, data, tmp_path / "sd1"))
    assert seen == [[(24, 40)], [(32, 32)]]  # SDXL keeps the 1:2 image's shape, SD 1.x crops a square


def test_masks_follow_their_images_into_the_bucket(tmp_path):
    """A 1:2 image whose left third is red, its mask white there: the bucketed sample and mask still agree."""
    from lora_ops.image_files import MASK_SUFFIX

    image = np.zeros((48, 96, 3), dtype=np.uint8)
    image[:, :32] = (255, 0, 0)
    mask = np.zeros((48, 96), dtype=np.uint8)
    mask[:, :32] = 255
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / f"a{MASK_SUFFIX}")
    config = DatasetConfig(
        tmp_path, 32, prompt="x", use_masks=True, crop="random", flip=True, buckets=Buckets(32, step=8)
    )
    ds = ImageDataset(config)
    for seed in range(4):
        sample = ds.sample(0, torch.Generator().manual_seed(seed))
        assert sample["mask"].shape == (1, 24, 40) and sample["pixel_values"].shape == (3, 24, 40)
        red = sample["pixel_values"][0] > 0.5
        assert torch.equal(red, sample["mask"][0] > 0.5)
        assert 0 < red.float().mean() < 1
