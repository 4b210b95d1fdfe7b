"""Convert a torch checkpoint into an `.npz` that jaxprompt loads without torch.

    python -m jaxprompt.convert ViT-B-16.pt vit_b16.npz
    python -m jaxprompt.convert vit_base_patch16_224.augreg_in21k.safetensors vit.npz

The arrays keep the reference names (OpenAI CLIP, open_clip, timm or AugReg), so
`load_clip` / `load_vit` map them exactly as they map the original file. The
output is validated by building the tower from it before it is written.
"""
from __future__ import annotations

import argparse
import sys

from jaxprompt.convert import io


def detect_family(arrays: dict) -> str:
  """'clip' for OpenAI/open_clip layouts, 'vit' for timm/AugReg/big_vision ViTs."""
  if any(k.startswith("visual.") for k in arrays) and "token_embedding.weight" in arrays:
    return "clip"
  from jaxprompt.convert import timm_vit  # pylint: disable=import-outside-toplevel
  try:
    timm_vit.detect_layout(arrays)
  except io.WeightMismatchError as e:
    raise ValueError("unrecognised checkpoint layout: expected OpenAI/open_clip CLIP "
                     f"(visual.*, token_embedding.weight) or a ViT. {e}") from None
  return "vit"


def validate(arrays: dict, family: str) -> None:
  if family == "clip":
    from jaxprompt.convert.openai_clip import load_clip  # pylint: disable=import-outside-toplevel
    load_clip(arrays)
  else:
    from jaxprompt.convert.timm_vit import load_vit  # pylint: disable=import-outside-toplevel
    load_vit(arrays)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxprompt.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="checkpoint: .pt/.pth (state dict or TorchScript), .safetensors, .npz")
  p.add_argument("dst", help="output .npz or .safetensors")
  p.add_argument("--no-check", action="store_true", help="skip building the tower from the output")
  args = p.parse_args(argv)
  arrays = io.read_arrays(args.src)
  family = detect_family(arrays)
  if not args.no_check:
    validate(arrays, family)
  io.write_arrays(args.dst, arrays)
  n = sum(int(a.size) for a in arrays.values())
  print(f"{args.src} -> {args.dst}: {family} layout, {len(arrays)} arrays, {n:,} values")
  return 0


if __name__ == "__main__":
  sys.exit(main())
