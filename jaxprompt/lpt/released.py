"""The authors' released LPT checkpoint (`LPT_places.pth`) -> jaxprompt trees.

    vit_model, params, info = convert("LPT_places.pth")

The file (DongSky/LPT, `phase2_test/eval_phase2.py`) is `{'state_dict': ...}`,
keys possibly prefixed `module.` (DataParallel), holding the whole `VPT_ViT`
(`phase2_test/PromptModels_pool*/structure.py`):

* the timm ViT backbone at the top level: `patch_embed.proj.*`, `cls_token`,
  `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2}.*`, `norm.*` (the timm head is an identity, so no `head.*`);
* `prompt_learner.Prompt_Tokens` (depth, T, D): the shared prompts, one row per block;
* `prompt_learner.Prompt_Tokens_pool` (pool, G, T, D): group prompts for the
  last G blocks (blocks depth-G .. depth-1);
* `prompt_learner.Prompt_Keys` (pool, D);
* `prompt_learner.head.weight` (D, C): the cosine classifier, stored (in, out).

Result: `params = {'img': ..., 'prompt': {'shared', 'group', 'keys'}, 'head':
{'kernel': (D, C)}}`; the tower is built with LayerNorm eps 1e-5 (LPT passes
`nn.LayerNorm`) and exact GELU. The group-prompt layout is the reference's
(pool, layer, token, width), which is what `ViT` takes per sample after top-k
averaging: `prompts=(shared, group_b), prompt_start=(0, -G)`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxprompt.convert import io, timm_vit
from jaxprompt.convert.io import WeightMismatchError, check_names_and_shapes
from jaxprompt.models.vit import ViT, ViTModel

PL = "prompt_learner."
SHARED, GROUP, KEYS, HEAD = (PL + "Prompt_Tokens", PL + "Prompt_Tokens_pool",
                             PL + "Prompt_Keys", PL + "head.weight")
LN_EPS = 1e-5


def _read(source, field: Optional[str] = None) -> tuple[dict[str, np.ndarray], str]:
  return io.read_state_dict(source, field=field)


def convert(state_dict_or_path: Union[str, os.PathLike, Mapping[str, Any]], *,
            heads: Optional[int] = None, field: Optional[str] = None
            ) -> tuple[ViTModel, dict, dict]:
  """Converts LPT's phase-2 checkpoint (whole model).

  Args:
    state_dict_or_path: `LPT_places.pth`, or its (possibly wrapped) state dict.
    heads: attention heads; default width // 64 (12 for ViT-B/16).

  Returns:
    `(vit_model, params, info)`: `vit_model.apply({'params': params}, images,
    prompts=..., prompt_start=...)` runs the tower (extra top-level groups are
    ignored by it). `info`: 'num_classes', 'prompt_length', 'pool_size',
    'group_layers', 'group_start', 'depth', 'width', 'grid', 'ln_eps', 'ignored'.

  Raises:
    WeightMismatchError: a diff in the file's own names when the backbone or
      the prompt tensors do not fit.
  """
  sd, source = _read(state_dict_or_path, field)
  backbone = {k: v for k, v in sd.items() if not k.startswith(PL)}
  learner = {k: v for k, v in sd.items() if k.startswith(PL)}
  if "patch_embed.proj.weight" not in backbone:
    raise WeightMismatchError(
        f"{source} is not an LPT checkpoint: no patch_embed.proj.weight (a timm ViT at the top "
        f"level); first keys: {sorted(sd)[:8]}")
  ignored = sorted(k for k in backbone if k.startswith("head."))
  config = timm_vit.infer_config(backbone, heads=heads)
  try:
    img = timm_vit.from_timm(backbone, config)["params"]["img"]
  except WeightMismatchError as e:
    raise WeightMismatchError(str(e).replace("timm ViT state dict", f"{source} (backbone)", 1)
                              ) from None

  d, depth = config.width, config.depth
  shape = lambda k, i, default=0: (int(learner[k].shape[i])
                                   if k in learner and learner[k].ndim > i else default)
  t = shape(SHARED, 1)
  pool, g = shape(GROUP, 0), shape(GROUP, 1)
  num_classes = shape(HEAD, 1)
  if HEAD in learner and learner[HEAD].ndim == 2 and learner[HEAD].shape[0] != d:
    raise WeightMismatchError(
        f"{source}: {HEAD} has shape {tuple(learner[HEAD].shape)}; LPT's cosine classifier is "
        f"stored (in, out) = ({d}, classes)")
  want = {SHARED: (depth, t, d), GROUP: (pool, g, t, d), KEYS: (pool, d), HEAD: (d, num_classes)}
  check_names_and_shapes(want, learner, f"{source} (prompt_learner)")
  if not 0 < g <= depth:
    raise WeightMismatchError(f"{source}: {GROUP} covers {g} blocks of a {depth}-block tower")

  params = {
      "img": jax.tree.map(jnp.asarray, img),
      "prompt": {"shared": jnp.asarray(learner[SHARED], jnp.float32),
                 "group": jnp.asarray(learner[GROUP], jnp.float32),
                 "keys": jnp.asarray(learner[KEYS], jnp.float32)},
      "head": {"kernel": jnp.asarray(learner[HEAD], jnp.float32)},
  }
  info = {"num_classes": num_classes, "prompt_length": t, "pool_size": pool, "group_layers": g,
          "group_start": depth - g, "depth": depth, "width": d, "heads": config.heads,
          "grid": tuple(config.grid), "ln_eps": LN_EPS, "ignored": ignored, "config": config}
  model = ViTModel(img=ViT(config, ln_eps=LN_EPS, exact_gelu=True))
  return model, params, info


__all__ = ["convert"]


def load_released(config) -> tuple[ViT, dict, dict]:
  """(tower, host params {'img', 'prompt', 'head'}, converter info) of
  `model.released_checkpoint` (LPT's phase-2 model)."""
  path = config.model.released_checkpoint
  model, params, info = convert(path, field="model.released_checkpoint")
  logging.info("released checkpoint %s: %d classes, depth %d, prompts %d x %d, pool %d, "
               "group layers %d, grid %s", path, info["num_classes"], info["depth"],
               info["depth"], info["prompt_length"], info["pool_size"], info["group_layers"],
               info["grid"])
  return model.img, jax.device_get(params), info


def check_released(config, info: Mapping[str, Any], num_classes: int) -> None:
  """Refuse a released LPT checkpoint that does not fit the config or the dataset,
  naming the config field to change."""
  m, path = config.model, config.model.released_checkpoint
  vcfg = info["config"]
  side = [g * vcfg.patch for g in info["grid"]]
  wrong = []
  if side[0] != side[1] or int(m.image_size) != side[0]:
    wrong.append(f"model.image_size={side[0]} (its position embedding is a "
                 f"{info['grid'][0]}x{info['grid'][1]} grid of {vcfg.patch}-pixel patches; "
                 f"config {m.image_size})")
  for field, key in (("prompt_length", "prompt_length"), ("pool_size", "pool_size"),
                     ("group_layers", "group_layers")):
    if int(m[field]) != int(info[key]):
      wrong.append(f"model.{field}={info[key]} (config {m[field]})")
  if float(m.ln_eps) != float(info["ln_eps"]):
    wrong.append(f"model.ln_eps={info['ln_eps']} (config {m.ln_eps})")
  if not m.exact_gelu:
    wrong.append("model.exact_gelu=True")
  if m.head != "cosine":
    wrong.append(f"model.head='cosine' (config {m.head!r})")
  if wrong:
    raise ValueError(f"{path} does not fit this config: set " + "; ".join(wrong))
  if int(info["num_classes"]) != int(num_classes):
    hint = (f"set data.num_classes={info['num_classes']} if the lists use that many labels"
            if config.data.name == "list" else
            "set data.name (and data.root / data.lists_dir) to the dataset it was trained on")
    raise ValueError(
        f"{path} classifies {info['num_classes']} classes but data.name="
        f"{config.data.name!r} has {num_classes}: {hint}")
