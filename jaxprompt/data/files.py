"""Image files under a folder, for feature extraction and prediction on a user's images."""
from __future__ import annotations

import os
from typing import Sequence

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
