"""Convert a torch checkpoint into an `.npz` that jaxprompt loads without torch.

    python -m jaxprompt.convert ViT-B-16.pt vit_b16.npz
    python -m jaxprompt.convert vit_base_patch16_224.augreg_in21k.safetensors vit.npz

The arrays keep the reference names (OpenAI CLIP, open_clip, timm or AugReg), so
`load_clip` / `load_vit` map them exactly as they map the original file. The
output is validated by building the tower from it before it is written. A file
that cannot be read or does not fit a tower is one error line and exit status 1
(`--traceback` shows where it came from).
"""
from __future__ import annotations

import argparse
import sys

from jaxprompt import metrics
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


def convert(src: str, dst: str, check: bool = True) -> str:
  """Read, detect, validate, write; one progress bar over the four phases."""
  arrays, family = {}, ""
  phases = ["read", "detect layout", "check"] if check else ["read", "detect layout"]
  for phase in metrics.progress(phases + ["write"], desc=f"converting {src}", unit="phase",
                                enabled=True):
    if phase == "read":
      arrays = io.read_arrays(src)
    elif phase == "detect layout":
      family = detect_family(arrays)
    elif phase == "check":
      validate(arrays, family)
    else:
      io.write_arrays(dst, arrays)
  n = sum(int(a.size) for a in arrays.values())
  return f"{src} -> {dst}: {family} layout, {len(arrays)} arrays, {n:,} values"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxprompt.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="checkpoint: .pt/.pth (state dict or TorchScript), .safetensors, .npz")
  p.add_argument("dst", help="output .npz or .safetensors")
  p.add_argument("--no-check", action="store_true", help="skip building the tower from the output")
  p.add_argument("--traceback", action="store_true", help="on an error, print the traceback")
  args = p.parse_args(argv)
  try:
    print(convert(args.src, args.dst, check=not args.no_check))
  except (OSError, ValueError, ImportError) as e:  # what a wrong file or path gives
    if args.traceback:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
