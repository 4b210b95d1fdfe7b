"""The authors' released prompt learners (KaiyangZhou/CoOp: `prompt_learner/model.pth.tar-<epoch>`,
a Dassl checkpoint {'state_dict', 'epoch', ...}) -> our `prompt` subtree.

`token_prefix` / `token_suffix` are dropped, as the reference does on load, so the context is
re-combined with the current class names.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from jaxprompt.coop import model as M
from jaxprompt.convert.io import read_arrays

DROPPED = ("token_prefix", "token_suffix")


def convert(state_dict: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
  """{'ctx', 'meta_net.linear{1,2}.{weight,bias}'} -> {'ctx', 'meta_net': {...}} (float32)."""
  sd = {k[len("prompt_learner."):] if k.startswith("prompt_learner.") else k: v
        for k, v in state_dict.items()}
  if "ctx" not in sd:
    raise ValueError(f"{source}: no 'ctx' tensor; found {sorted(sd)[:8]} (expected a CoOp/"
                     f"CoCoOp prompt_learner/model.pth.tar-<epoch>)")
  out = {"ctx": np.asarray(sd["ctx"], np.float32)}
  meta = {}
  for layer in ("linear1", "linear2"):
    w, b = sd.get(f"meta_net.{layer}.weight"), sd.get(f"meta_net.{layer}.bias")
    if w is None and b is None:
      continue
    if w is None or b is None:
      raise ValueError(f"{source}: meta_net.{layer} needs both weight and bias")
    meta[layer] = {"kernel": np.asarray(w, np.float32).T, "bias": np.asarray(b, np.float32)}
  if meta:
    if len(meta) != 2:
      raise ValueError(f"{source}: incomplete Meta-Net ({sorted(meta)})")
    out["meta_net"] = meta
  extra = sorted(set(sd) - {"ctx", *DROPPED} - {f"meta_net.{l}.{p}" for l in ("linear1", "linear2")
                                               for p in ("weight", "bias")})
  if extra:
    raise ValueError(f"{source}: unexpected tensors {extra[:8]}")
  return out


def load(path: str, spec: M.PromptSpec, *, width: int, num_classes: int, image_dim: int,
         field: Optional[str] = None) -> dict:
  """Reads, converts and checks a released prompt learner against the config (`field`:
  the config field the path came from, for the error messages)."""
  prompt = convert(read_arrays(path, field=field), source=path)
  M.check_prompt(prompt, spec, width=width, num_classes=num_classes, source=path)
  if "meta_net" in prompt and prompt["meta_net"]["linear1"]["kernel"].shape[0] != image_dim:
    raise ValueError(f"{path}: Meta-Net input width "
                     f"{prompt['meta_net']['linear1']['kernel'].shape[0]} != the CLIP image "
                     f"embedding width {image_dim}")
  return prompt
