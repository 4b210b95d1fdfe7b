"""A small long-tailed classification set built from scikit-learn's handwritten digits.

`sklearn.datasets.load_digits` ships with scikit-learn (1,797 8x8 grey images, about 180 per
class), so the set needs no download. Train counts follow the exponential profile of the
CIFAR-LT recipes, `n_c = max_per_class * (1 / imbalance) ** (c / (C - 1))`; with the defaults
(150 images for class 0, imbalance 30) the LPT buckets hold 2 many-shot (n > 100), 4
medium-shot (20 < n <= 100) and 4 few-shot (n <= 20) classes. The test split is balanced and
drawn from source images that no train record uses.

Each 8x8 digit is rendered once into an (H, W, 3) uint8 RGB image with mild variety, so that
the usual augmentations (crops, flips, colour jitter) have something to work with: a small
rotation, scale and shift, a random ink and paper colour, and light pixel noise.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from jaxprompt.lpt.data import LTDataset, LTRecord, cifar_lt_img_num_per_cls

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class LTSplits:
  """Train and test splits of a long-tailed set, with what a pipeline needs to size itself.

  `train_source` / `test_source` index the source images (load_digits rows) behind each
  record, in record order; the two never share an index.
  """
  train: LTDataset
  test: LTDataset
  class_counts: np.ndarray  # (C,) train images per class
  class_names: tuple[str, ...]
  train_source: np.ndarray
  test_source: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def longtail_counts(num_classes: int, max_per_class: int, imbalance: float) -> list[int]:
  """Per-class train counts of the exponential profile (the CIFAR-LT recipes' formula)."""
  return cifar_lt_img_num_per_cls(imbalance, num_classes, img_max=float(max_per_class))


def _render(digit: np.ndarray, size: int, rng: np.random.Generator, variety: bool) -> np.ndarray:
  """One 8x8 digit (0..16) -> (size, size, 3) uint8 with random pose, colours and noise."""
  ink = (digit.astype(np.float32) / 16.0) * 255.0
  img = Image.fromarray(ink.astype(np.float32))  # float32 -> PIL mode "F"
  if not variety:
    up = img.resize((size, size), Image.BILINEAR)
    a = np.clip(np.asarray(up, np.float32) / 255.0, 0.0, 1.0)[..., None]
    return np.round(a * 255.0).repeat(3, axis=-1).astype(np.uint8)
  # Pad before resampling so a rotation or shift does not clip the strokes.
  canvas = Image.new("F", (12, 12), 0.0)
  canvas.paste(img, (2, 2))
  angle = float(rng.uniform(-12.0, 12.0))
  canvas = canvas.rotate(angle, resample=Image.BILINEAR)
  scale = float(rng.uniform(0.9, 1.1))
  side = max(int(round(size * 12 / 8 * scale)), size)
  up = np.asarray(canvas.resize((side, side), Image.BILINEAR), np.float32)
  # Crop a size x size window around the centre, shifted by up to ~6% of the side.
  shift = max(1, size // 16)
  c = (side - size) // 2
  top = int(np.clip(c + rng.integers(-shift, shift + 1), 0, side - size))
  left = int(np.clip(c + rng.integers(-shift, shift + 1), 0, side - size))
  a = np.clip(up[top:top + size, left:left + size] / 255.0, 0.0, 1.0)[..., None]
  paper = rng.uniform(0.0, 0.35, size=3)
  ink_rgb = rng.uniform(0.55, 1.0, size=3)
  ink_rgb[rng.integers(3)] = rng.uniform(0.85, 1.0)  # keep the ink clearly brighter than paper
  out = paper * (1.0 - a) + ink_rgb * a
  out = out + rng.normal(0.0, 0.02, size=out.shape)
  return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def digits_longtail(*, imbalance: float = 30.0, seed: int = 0, size: int = 16,
                    max_per_class: int = 150, test_per_class: int = 20,
                    classes: Optional[Sequence[int]] = None, variety: bool = True) -> LTSplits:
  """The long-tailed digits set: records hold uint8 (size, size, 3) arrays.

  Args:
    imbalance: ratio of the largest to the smallest train class (>= 1).
    seed: chooses which source images go to train/test and the per-image variety.
    size: side of the square output images (16 or 32 suit a patch-4 ViT).
    max_per_class: train images of the first (head) class.
    test_per_class: test images of every class (balanced).
    classes: digit classes to use, in head-to-tail order (default 0..9); label i is
      `classes[i]`.
    variety: False gives plain grey upsampled digits (for debugging).

  Returns:
    `LTSplits` with train/test `LTDataset`s, train class counts and class names.
  """
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  images, targets = np.asarray(digits.images), np.asarray(digits.target)
  classes = list(range(10)) if classes is None else [int(c) for c in classes]
  if len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
    raise ValueError(f"classes must be distinct digits 0..9, got {classes}")
  if len(classes) < 2:
    raise ValueError("need at least two classes")
  counts = longtail_counts(len(classes), max_per_class, imbalance)
  if min(counts) < 1:
    raise ValueError(f"imbalance {imbalance} with max_per_class {max_per_class} leaves a class "
                     f"with no train image: {counts}")
  rng = np.random.default_rng(seed)
  train_src, test_src, train_lab, test_lab = [], [], [], []
  for label, digit in enumerate(classes):
    pool = np.flatnonzero(targets == digit)
    need = counts[label] + test_per_class
    if need > pool.size:
      raise ValueError(f"digit {digit} has {pool.size} images; {counts[label]} train + "
                       f"{test_per_class} test do not fit")
    pool = rng.permutation(pool)
    test_src.append(pool[:test_per_class])
    train_src.append(pool[test_per_class:need])
    train_lab += [label] * counts[label]
    test_lab += [label] * test_per_class
  train_src, test_src = np.concatenate(train_src), np.concatenate(test_src)
  # One generator for the rendering, separate from the split, so `variety` does not move it.
  render_rng = np.random.default_rng([seed, 1])

  def records(src, labels):
    return [LTRecord(_render(images[i], size, render_rng, variety), int(y))
            for i, y in zip(src, labels)]

  names = tuple(DIGIT_NAMES[c] for c in classes)
  train = LTDataset(records(train_src, train_lab), len(classes), names)
  test = LTDataset(records(test_src, test_lab), len(classes), names)
  return LTSplits(train, test, np.asarray(counts, np.int64), names, train_src.astype(np.int64),
                  test_src.astype(np.int64))
