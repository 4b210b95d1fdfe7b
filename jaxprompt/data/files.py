"""Image files: listing a folder (feature extraction, prediction) and opening one as RGB."""
from __future__ import annotations

import os
from typing import Sequence

from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(folder: str, exts: Sequence[str] = IMAGE_EXTS) -> list[str]:
  """Image files under `folder` (recursive), sorted by relative path."""
  folder = os.path.expanduser(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: {folder}")
  exts = tuple(e.lower() for e in exts)
  out = []
  for d, _, files in os.walk(folder):
    out.extend(os.path.join(d, f) for f in files if f.lower().endswith(exts))
  if not out:
    raise FileNotFoundError(f"no images ({', '.join(exts)}) under {folder}")
  return sorted(out, key=lambda p: os.path.relpath(p, folder))


def load_image(path: str) -> Image.Image:
  """Open an image as RGB; a missing or unreadable file raises an error naming the path."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file not found: {path}")
  try:
    with Image.open(path) as im:
      return im.convert("RGB")  # convert() forces the full decode while the file is open
  except Exception as e:  # PIL raises several types for corrupt or truncated files
    raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
