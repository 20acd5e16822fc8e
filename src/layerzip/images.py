"""Calibration images for vision models (`layerzip compress RESNET_DIR --method tucker2 --calib IMAGES_DIR`): PNG /
JPEG files, each resized (short side) and center-cropped to the model's input size, then normalized, as the model
directory's preprocessor_config.json says (`size`, `crop_size`, `image_mean`, `image_std`; ImageNet's 224 and
mean / std when it has none).

>>> batches = image_batches("photos/", n_samples=32, model_dir="resnet-50")     # doctest: +SKIP
>>> batches[0]["pixel_values"].shape                                            # doctest: +SKIP
torch.Size([8, 3, 224, 224])
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LayerzipError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET = {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class ImageBatches(list):
    """[{"pixel_values": (B, 3, H, W)}, ...] with `used`: what was read."""
    used: dict


def preprocessing(model_dir: str | Path | None) -> dict:
    """Input size, mean and std from the directory's preprocessor_config.json (ImageNet's when absent)."""
    f = Path(model_dir) / "preprocessor_config.json" if model_dir else None
    if f is None or not f.is_file():
        return dict(IMAGENET)
    try:
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LayerzipError(f"{f} is not valid JSON ({e}); repair or remove it") from None
    size = doc.get("crop_size") or doc.get("size") or IMAGENET["size"]
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or IMAGENET["size"]
    return {"size": int(size), "mean": tuple(doc.get("image_mean", IMAGENET["mean"])),
            "std": tuple(doc.get("image_std", IMAGENET["std"]))}


def image_batches(source: str | Path, n_samples: int = 64, model_dir=None, batch_size: int = 8) -> ImageBatches:
    """The first `n_samples` images of `source` (a directory, sorted by name, or one file) as model inputs."""
    from PIL import Image, UnidentifiedImageError
    src = Path(source)
    if not src.exists():
        raise LayerzipError(f"--calib {src} does not exist; give a directory of PNG / JPEG images for a vision model")
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in SUFFIXES) if src.is_dir() else [src]
    if not files or files[0].suffix.lower() not in SUFFIXES:
        raise LayerzipError(f"--calib {src} holds no PNG / JPEG image; a vision model calibrates on images")
    prep = preprocessing(model_dir)
    s = prep["size"]
    mean = torch.tensor(prep["mean"])[:, None, None]
    std = torch.tensor(prep["std"])[:, None, None]
    out = []
    for f in files[:n_samples]:
        try:
            img = Image.open(f).convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise LayerzipError(f"--calib: cannot read {f} ({e}); remove it or replace it") from None
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
        x = x.permute(2, 0, 1)[None] / 255
        h, w = x.shape[-2:]
        scale = s / min(h, w)
        x = F.interpolate(x, size=(max(s, round(h * scale)), max(s, round(w * scale))), mode="bilinear",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
        out.append(((x[0, :, top:top + s, left:left + s]) - mean) / std)
    batches = ImageBatches({"pixel_values": torch.stack(out[i:i + batch_size])}
                           for i in range(0, len(out), batch_size))
    batches.used = {"images": len(out), "image_size": s}
    return batches
