"""Transforms of LPT's recipe (DongSky/LPT phase2_test/datasets.py), numpy/PIL, returning HWC float32.

train: RandomResizedCrop(size) (torchvision defaults: scale (0.08, 1), ratio
       (3/4, 4/3), bilinear) -> RandomHorizontalFlip -> Normalize(0.5, 0.5)
test:  Resize to a square (resize, resize) (aspect ratio not kept; 256 for 224)
       -> CenterCrop(size) -> Normalize(0.5, 0.5)

Randomness comes only from the explicit `np.random.Generator` (the loader derives
one per sample from seed, epoch and position). The crop-box sampling follows
torchvision's `RandomResizedCrop.get_params` law (10 tries, then a central crop
clamped to the ratio range); its RNG stream is not torch's.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import numpy as np
from PIL import Image

from jaxprompt.lpt.data import LTRecord, load_image as load_record_image

LPT_MEAN = (0.5, 0.5, 0.5)
LPT_STD = (0.5, 0.5, 0.5)

ImageLike = Union[np.ndarray, Image.Image]


def _pil(img: ImageLike) -> Image.Image:
  if isinstance(img, Image.Image):
    return img.convert("RGB") if img.mode != "RGB" else img
  return Image.fromarray(np.asarray(img, np.uint8))


def normalize(x: np.ndarray, mean: Sequence[float] = LPT_MEAN,
              std: Sequence[float] = LPT_STD) -> np.ndarray:
  """uint8 HWC -> float32 (x / 255 - mean) / std, as ToTensor + Normalize."""
  x = x.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)
                            ) -> tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision's RandomResizedCrop.get_params."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def lpt_train_transform(img: ImageLike, rng: np.random.Generator, size: int = 224, *,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0), flip: bool = True,
                        mean: Sequence[float] = LPT_MEAN,
                        std: Sequence[float] = LPT_STD) -> np.ndarray:
  """RandomResizedCrop(size) + RandomHorizontalFlip(0.5) + Normalize: (size, size, 3)."""
  pil = _pil(img)
  top, left, h, w = random_resized_crop_box(rng, pil.height, pil.width, scale, ratio)
  out = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  x = np.asarray(out, np.uint8)
  if flip and rng.random() < 0.5:
    x = x[:, ::-1]
  return normalize(x, mean, std)


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
  """torchvision CenterCrop on an image at least `size` on each side."""
  h, w = x.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return x[top:top + size, left:left + size]


def lpt_test_transform(img: ImageLike, size: int = 224, resize: int | None = None, *,
                       mean: Sequence[float] = LPT_MEAN,
                       std: Sequence[float] = LPT_STD) -> np.ndarray:
  """Square Resize((resize, resize)) (default size * 8 // 7, 256 for 224) + CenterCrop."""
  resize = int(resize or size * 8 // 7)
  x = np.asarray(_pil(img).resize((resize, resize), Image.BILINEAR), np.uint8)
  return normalize(center_crop(x, size), mean, std)


def make_lt_decode(train: bool, size: int = 224, *, resize: int | None = None,
                   mean: Sequence[float] = LPT_MEAN, std: Sequence[float] = LPT_STD,
                   **train_kw: Any) -> Callable[[LTRecord, np.random.Generator], dict]:
  """A loader `decode(record, rng) -> {'image': (S, S, 3) float32, 'label': int32}`."""

  def decode(record: LTRecord, rng: np.random.Generator) -> dict:
    img = load_record_image(record)
    if train:
      x = lpt_train_transform(img, rng, size, mean=mean, std=std, **train_kw)
    else:
      x = lpt_test_transform(img, size, resize, mean=mean, std=std)
    return {"image": np.ascontiguousarray(x), "label": np.int32(record.label)}

  return decode
