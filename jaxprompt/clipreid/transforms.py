"""Image transforms of the CLIP-ReID recipes, in numpy/PIL, returning HWC float32.

Random transforms take an explicit `np.random.Generator` (the loader derives one per sample
from seed, epoch and position) and never touch a global RNG. The deterministic steps match
torchvision on PIL images exactly (same PIL resampling, same float32 arithmetic).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from jaxprompt.data.files import load_image  # noqa: F401 (re-export: the decode functions use it)

# ViT configs of CLIP-ReID normalise with 0.5/0.5, not with CLIP's own constants.
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)
# RN50 configs use the ImageNet constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def norm_constants(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of the reference configs by backbone name ('ViT-B-16', 'RN50', ...)."""
  b = backbone.lower().replace("-", "").replace("_", "").replace("/", "")
  if b.startswith("vit"):
    return VIT_MEAN, VIT_STD
  if b.startswith("rn") or b.startswith("resnet"):
    return IMAGENET_MEAN, IMAGENET_STD
  raise ValueError(f"no normalisation constants for backbone {backbone!r} (expected ViT-* or RN*)")


# ---------------------------------------------------------------------------------------------
# Deterministic pieces


def resize(img: Image.Image, size: Sequence[int], resample: int) -> np.ndarray:
  """Resize to exactly (H, W), ignoring the aspect ratio, as torchvision `Resize((H, W))`."""
  h, w = int(size[0]), int(size[1])
  return np.asarray(img.resize((w, h), resample=resample), dtype=np.uint8)


def hflip(x: np.ndarray) -> np.ndarray:
  return x[:, ::-1]


def zero_pad(x: np.ndarray, pad: int) -> np.ndarray:
  """Constant-0 (black) padding on all four sides, as torchvision `Pad(pad)`."""
  return np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="constant", constant_values=0)


def crop(x: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
  return x[top:top + h, left:left + w]


def to_float_normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 HWC -> float32 in [0, 1] -> (x - mean) / std, in float32 like ToTensor+Normalize."""
  x = x.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ---------------------------------------------------------------------------------------------
# Random erasing (timm `RandomErasing(probability, mode='pixel', max_count=1)`)


def erasing_box(rng: np.random.Generator, img_h: int, img_w: int, p: float = 0.5,
                min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                max_aspect: float | None = None, attempts: int = 10
                ) -> tuple[int, int, int, int] | None:
  """(top, left, h, w) of the rectangle to erase, or None.

  timm's rule: with probability p, up to `attempts` tries of area fraction U(min, max) and
  log-uniform aspect ratio (h/w); the first box strictly smaller than the image is used.
  """
  if rng.random() >= p:  # timm skips when random() > p; the tie has probability zero
    return None
  area = img_h * img_w
  log_lo, log_hi = math.log(min_aspect), math.log(max_aspect or 1 / min_aspect)
  for _ in range(attempts):
    target = rng.uniform(min_area, max_area) * area
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if w < img_w and h < img_h:
      top = int(rng.integers(0, img_h - h + 1))
      left = int(rng.integers(0, img_w - w + 1))
      return top, left, h, w
  return None


def random_erasing(x: np.ndarray, rng: np.random.Generator, p: float = 0.5, **kw) -> np.ndarray:
  """Fill one random rectangle of a normalised HWC image with per-pixel N(0, 1) noise."""
  box = erasing_box(rng, x.shape[0], x.shape[1], p, **kw)
  if box is None:
    return x
  top, left, h, w = box
  x = x.copy()
  x[top:top + h, left:left + w] = rng.standard_normal((h, w, x.shape[2]), dtype=np.float32)
  return x


# ---------------------------------------------------------------------------------------------
# The recipes


def reid_train_transform(img: Image.Image, rng: np.random.Generator,
                         size: Sequence[int] = (256, 128), mean: Sequence[float] = VIT_MEAN,
                         std: Sequence[float] = VIT_STD,
                         flip_p: float = 0.5, pad: int = 10, erase_p: float = 0.5) -> np.ndarray:
  """Stage-2 training augmentation, in the reference's order.

  Bicubic resize to exactly `size`; horizontal flip with `flip_p`; zero pad `pad`; random
  crop back to `size`; [0, 1]; normalise; random erasing with `erase_p` (after
  normalisation, so the noise is N(0, 1) in normalised units). Random draws, in order:
  flip, crop top, crop left, then the erasing draws.
  """
  h, w = int(size[0]), int(size[1])
  x = resize(img, size, Image.Resampling.BICUBIC)
  if rng.random() < flip_p:
    x = hflip(x)
  if pad:
    x = zero_pad(x, pad)
  top = int(rng.integers(0, x.shape[0] - h + 1))
  left = int(rng.integers(0, x.shape[1] - w + 1))
  x = crop(x, top, left, h, w)
  x = to_float_normalize(x, mean, std)
  if erase_p > 0:
    x = random_erasing(x, rng, erase_p)
  return np.ascontiguousarray(x, dtype=np.float32)


def reid_test_transform(img: Image.Image, size: Sequence[int] = (256, 128),
                        mean: Sequence[float] = VIT_MEAN,
                        std: Sequence[float] = VIT_STD) -> np.ndarray:
  """Test transform (also used for the stage-1 feature cache): bilinear resize, normalise.

  The bilinear/bicubic mismatch with training is the reference's (inherited from TransReID).
  """
  x = resize(img, size, Image.Resampling.BILINEAR)
  return np.ascontiguousarray(to_float_normalize(x, mean, std))


def make_reid_decode(train: bool, size: Sequence[int] = (256, 128),
                     mean: Sequence[float] = VIT_MEAN, std: Sequence[float] = VIT_STD,
                     **train_kw: Any
                     ) -> Callable[[Any, np.random.Generator], dict[str, np.ndarray]]:
  """A `decode(record, rng)` for the loader: reads `record.path`, returns image + labels.

  Output keys: image (H, W, 3) float32, pid, camid, viewid (int32 scalars). `train_kw`
  goes to `reid_train_transform` (flip_p, pad, erase_p).
  """
  def decode(record: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    img = load_image(record.path)
    if train:
      x = reid_train_transform(img, rng, size, mean, std, **train_kw)
    else:
      x = reid_test_transform(img, size, mean, std)
    return {"image": x,
            "pid": np.asarray(record.pid, np.int32),
            "camid": np.asarray(record.camid, np.int32),
            "viewid": np.asarray(record.viewid, np.int32)}
  return decode
