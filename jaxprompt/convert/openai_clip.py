"""OpenAI / open_clip CLIP state dicts -> `jaxprompt.models.clip` variables.

Pure functions over a flat `{name: array}` dict (see `jaxprompt.convert.io.read_arrays`):

  infer_config(state_dict) -> CLIPConfig        architecture, as OpenAI's `build_model`
  to_variables(state_dict, config) -> variables  names, transposes, position-embedding resize

The name mapping is derived from the Flax model itself: every Flax leaf has one
torch name and a transpose, so the expected torch names and shapes come from
`jax.eval_shape(model.init)`, and a file that does not fit fails with a diff in
the file's own names.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from jaxprompt.convert.io import (WeightMismatchError, as_numpy, check_names_and_shapes, flatten,
                                  read_arrays, strip_module, unflatten)
from jaxprompt.models.clip import CLIP, CLIPConfig, Dtype, init_shapes
from jaxprompt.models.layers import resize_grid_embedding

# Entries of the reference state dicts that carry no weights of ours.
_IGNORED_EXACT = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_IGNORED_SUFFIXES = (".num_batches_tracked", ".attn_mask")

_CONV_OIHW_TO_HWIO = (2, 3, 1, 0)
_LINEAR_OUT_IN_TO_IN_OUT = (1, 0)


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Strips `module.`, drops BN counters, masks and OpenAI's int metadata; numpy values."""
  out = {}
  for k, v in state_dict.items():
    k = strip_module(k)
    if k in _IGNORED_EXACT or k.endswith(_IGNORED_SUFFIXES):
      continue
    out[k] = as_numpy(v)
  return out


def _count(state_dict: Mapping[str, Any], prefix: str) -> int:
  """Number of distinct indices `i` in keys `prefix.i.*`."""
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return len({m.group(1) for k in state_dict if (m := pat.match(k))})


def infer_config(state_dict: Mapping[str, Any]) -> CLIPConfig:
  """The architecture of an OpenAI/open_clip CLIP state dict, read from shapes."""
  sd = clean_state_dict(state_dict)

  def shape(name: str) -> tuple[int, ...]:
    if name not in sd:
      raise WeightMismatchError(
          f"not an OpenAI/open_clip CLIP state dict: missing {name!r} "
          f"(first keys: {sorted(sd)[:8]})")
    return sd[name].shape

  text = dict(
      embed_dim=shape("text_projection")[1],
      context_length=shape("positional_embedding")[0],
      vocab_size=shape("token_embedding.weight")[0],
      text_width=shape("ln_final.weight")[0],
      text_heads=shape("ln_final.weight")[0] // 64,
      text_layers=_count(sd, "transformer.resblocks"),
  )
  if "visual.proj" in sd:  # ViT
    width = shape("visual.conv1.weight")[0]
    grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
    return CLIPConfig(vision="vit", vision_width=width,
                      vision_layers=_count(sd, "visual.transformer.resblocks"),
                      vision_heads=width // 64, patch_size=shape("visual.conv1.weight")[-1],
                      pretrained_grid=grid, **text)
  width = shape("visual.layer1.0.conv1.weight")[0]
  layers = tuple(_count(sd, f"visual.layer{i}") for i in range(1, 5))
  grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
  # Unlike OpenAI (embed_dim from text_projection), the image side reads its own output
  # width, so a file whose towers disagree fails in the shape check, not in a matmul.
  return CLIPConfig(vision="resnet", vision_width=width, vision_layers=layers,
                    vision_heads=width * 32 // 64, patch_size=32, pretrained_grid=grid, **text)


# Flax path segment -> torch name segment (applied after the tower prefix).
_SEGMENTS = {
    "attn/qkv/kernel": "attn.in_proj_weight",
    "attn/qkv/bias": "attn.in_proj_bias",
    "attn/out": "attn.out_proj",
    "mlp/fc1": "mlp.c_fc",
    "mlp/fc2": "mlp.c_proj",
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def torch_name(flax_name: str, ndim: int) -> tuple[str, Optional[tuple[int, ...]]]:
  """'params/img/blocks_0/attn/qkv/kernel' -> ('visual.transformer.resblocks.0.attn.
  in_proj_weight', (1, 0)): the reference name and the transpose taking it to Flax."""
  _, tower, path = flax_name.split("/", 2)
  perm = None
  if path.endswith("/kernel"):
    perm = _CONV_OIHW_TO_HWIO if ndim == 4 else _LINEAR_OUT_IN_TO_IN_OUT
  for old, new in _SEGMENTS.items():
    path = path.replace(old, new)
  path = re.sub(r"^blocks_(\d+)", r"transformer/resblocks/\1", path)
  path = re.sub(r"^layer(\d)_(\d+)", r"layer\1/\2", path)
  parts = path.split("/")
  parts[-1] = _LEAVES.get(parts[-1], parts[-1]) if len(parts) > 1 else parts[-1]
  if tower == "txt" and parts == ["token_embedding"]:
    parts = ["token_embedding", "weight"]
  name = ".".join(parts)
  return ("visual." + name if tower == "img" else name), perm


def to_variables(state_dict: Mapping[str, Any], config: CLIPConfig,
                 source: str = "checkpoint") -> dict:
  """Maps a CLIP state dict onto the variables of `CLIP(config)`.

  The file must match `config.native()` exactly (else `WeightMismatchError` with a
  diff of missing / unexpected / misshapen names); position embeddings are then
  resized to `config.grid`.
  """
  sd = clean_state_dict(state_dict)
  expected = flatten(init_shapes(config.native()))
  table = {}  # torch name -> (flax name, perm)
  want = {}  # torch name -> torch shape
  for fname, leaf in expected.items():
    tname, perm = torch_name(fname, len(leaf.shape))
    table[tname] = (fname, perm)
    shape = tuple(leaf.shape)
    if perm is not None:  # flax_shape[i] = torch_shape[perm[i]]
      inv = [0] * len(perm)
      for i, p in enumerate(perm):
        inv[p] = shape[i]
      shape = tuple(inv)
    want[tname] = shape
  check_names_and_shapes(want, sd, source)

  flat = {}
  for tname, (fname, perm) in table.items():
    a = sd[tname]
    a = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
    flat[fname] = np.transpose(a, perm) if perm is not None else a
  variables = unflatten(flat)

  native_grid = (config.pretrained_grid, config.pretrained_grid)
  if tuple(config.grid) != native_grid:
    img = variables["params"]["img"]
    holder = img if config.vision == "vit" else img["attnpool"]
    holder["positional_embedding"] = np.asarray(resize_grid_embedding(
        jnp.asarray(holder["positional_embedding"]), native_grid, config.grid))
  return _to_jax(variables)


def _to_jax(tree):
  return {k: _to_jax(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}


__all__ = ["clean_state_dict", "infer_config", "to_variables", "torch_name"]


def load_clip(source: Union[str, os.PathLike, Mapping[str, Any]], *,
              image_size: Optional[Sequence[int]] = None,
              patch_stride: Optional[int] = None,
              last_stride: Optional[int] = None,
              dtype: Dtype = jnp.float32, remat: bool = False,
              field: Optional[str] = None) -> tuple[CLIP, dict]:
  """Builds CLIP from an OpenAI/open_clip checkpoint (path or dict of arrays).

  Returns `(model, variables)`; position embeddings are resized (bilinear, no
  antialias, class/mean row kept) when `image_size`/`patch_stride`/`last_stride`
  change the token grid. Parameters are float32; `dtype` is the compute dtype;
  `remat` rematerialises the ViT image tower's blocks (less memory, more compute).
  `field` names the config field the path came from, for the error messages.
  """
  if isinstance(source, Mapping):
    state_dict, label = source, "state dict"
  else:
    state_dict, label = read_arrays(source, field=field), repr(str(source))
  state_dict = clean_state_dict(state_dict)
  config = infer_config(state_dict).with_input(image_size, patch_stride, last_stride)
  variables = to_variables(state_dict, config, source=label)
  return CLIP(config, dtype=dtype, remat=remat), variables
