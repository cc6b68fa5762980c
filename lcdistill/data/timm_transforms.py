"""The CPU augmentation path: timm's create_transform with mean 0 / std 1, i.e. tensors in [0, 1]."""

from __future__ import annotations


def transforms(input_size: int, config: dict, data: dict, training: bool):
    """timm's transform pipeline with mean 0 / std 1, i.e. tensors in [0, 1]."""
    from timm.data import create_transform

    return create_transform(
        input_size=(3, input_size, input_size),
        is_training=training,
        scale=tuple(data["scale"]) if data["scale"] else None,
        ratio=tuple(data["ratio"]) if data["ratio"] else None,
        hflip=data["hflip"],
        color_jitter=data["color_jitter"],
        auto_augment=data["auto_augment"],
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def eval_transform(config: dict):
    """The deterministic eval pipeline (resize, centre crop by crop_pct) for a model's config."""
    no_aug = {"scale": None, "ratio": None, "hflip": 0.0, "color_jitter": 0.0, "auto_augment": None}
    return transforms(config["input_size"][-1], config, no_aug, training=False)
