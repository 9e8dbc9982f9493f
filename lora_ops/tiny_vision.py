"""Tiny random-weight vision models for preprocessing and evaluation, built offline.

Each model has the class of the real one the product uses (BLIP captioner, CLIPSeg segmenter, CLIP,
DINO ViT, Swin2SR upscaler) and is written with `save_pretrained` together with its processor, so it
loads through the same `from_pretrained` path as a hub id. Outputs are meaningless (random weights);
shapes, files and determinism are real.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .tiny import write_byte_level_tokenizer

# the vision side of every tiny model: 32 px images in 8 px patches
_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
_CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
    max_position_embeddings=77,
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=999,
)
_IMAGE_PROCESSOR = dict(size={"height": 32, "width": 32}, do_center_crop=False)


def _bert_vocab() -> dict[str, int]:
    """A BERT WordPiece vocabulary: specials, BLIP's decoder start token, lowercase letters and digits."""
    chars = list(string.ascii_lowercase + string.digits)
    words = ["a", "photo", "of", "the", "dog", "cat", "man", "woman", "on", "with", "in"]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + chars + ["##" + c for c in chars]
    tokens += [w for w in words if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


def _clip_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    write_byte_level_tokenizer(directory / "_tokenizer", _CLIP_TEXT["vocab_size"])
    return CLIPTokenizer.from_pretrained(directory / "_tokenizer", model_max_length=77)


def make_tiny_captioner(directory: str | Path, seed: int = 0) -> Path:
    """A BlipForConditionalGeneration + BlipProcessor folder (BERT WordPiece tokenizer written by hand)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    directory = Path(directory)
    vocab = _bert_vocab()
    # BLIP starts decoding at [DEC] and stops at [SEP], as the real checkpoints do
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        encoder_hidden_size=32,
        bos_token_id=vocab["[DEC]"],
        pad_token_id=vocab["[PAD]"],
        sep_token_id=vocab["[SEP]"],
        eos_token_id=vocab["[SEP]"],
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=_VISION, projection_dim=32))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_tiny_segmenter(directory: str | Path, seed: int = 0) -> Path:
    """A CLIPSegForImageSegmentation + CLIPSegProcessor folder (byte-level CLIP tokenizer)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    directory = Path(directory)
    tokenizer = _clip_tokenizer(directory)
    torch.manual_seed(seed)
    config = CLIPSegConfig(
        text_config=_CLIP_TEXT, vision_config=_VISION, projection_dim=32, reduce_dim=16, extract_layers=[0, 1]
    )
    model = CLIPSegForImageSegmentation(config)
    processor = CLIPSegProcessor(image_processor=ViTImageProcessor(**_IMAGE_PROCESSOR), tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """A CLIPModel + CLIPProcessor folder (the CLIP-T / CLIP-I scorer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    directory = Path(directory)
    tokenizer = _clip_tokenizer(directory)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=_CLIP_TEXT, vision_config=_VISION, projection_dim=32))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**_IMAGE_PROCESSOR), tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_tiny_dino(directory: str | Path, seed: int = 0) -> Path:
    """A ViTModel (no pooler, as facebook/dino-vits16) + ViTImageProcessor folder."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    directory = Path(directory)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**_VISION), add_pooling_layer=False)
    model.save_pretrained(directory)
    ViTImageProcessor(**_IMAGE_PROCESSOR).save_pretrained(directory)
    return directory


def make_tiny_upscaler(directory: str | Path, seed: int = 0) -> Path:
    """A Swin2SRForImageSuperResolution (x2, pixelshuffle, as caidas/swin2SR-classical-sr-x2-64) folder."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    directory = Path(directory)
    torch.manual_seed(seed)
    config = Swin2SRConfig(
        image_size=16, embed_dim=16, depths=[1], num_heads=[2], window_size=4, upscale=2, upsampler="pixelshuffle"
    )
    model = Swin2SRForImageSuperResolution(config)
    model.save_pretrained(directory)
    Swin2SRImageProcessor(pad_size=4).save_pretrained(directory)
    return directory


def make_tiny_preprocess_models(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Every tiny vision model in `directory`: {"captioner", "segmenter", "clip", "dino", "upscaler": path}."""
    directory = Path(directory)
    builders = {
        "captioner": make_tiny_captioner,
        "segmenter": make_tiny_segmenter,
        "clip": make_tiny_clip,
        "dino": make_tiny_dino,
        "upscaler": make_tiny_upscaler,
    }
    return {name: build(directory / name, seed=seed) for name, build in builders.items()}
