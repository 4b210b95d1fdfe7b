"""Name mapping from timm ViT state dicts and AugReg/big_vision `.npz` files to `models.vit`.

Pure functions over flat `{name: array}` dicts. The tower's params are
(under `params/img`): `patch_embed/{kernel,bias}`, `cls_token`, `pos_embed`,
`blocks_{i}/{ln_1,attn/qkv,attn/out,ln_2,mlp/fc1,mlp/fc2}`, `norm`.

Both source layouts are checked name by name and shape by shape against what
the inferred architecture needs, so a wrong file fails with a diff in the
file's own names. Classifier heads (`head.*`, `head/*`) and the AugReg
pre-logits layer are not part of the tower and are skipped.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.convert.io import WeightMismatchError, check_names_and_shapes, read_arrays, unflatten
from jaxprompt.models.vit import Dtype, ViT, ViTConfig, ViTModel, resize_pos_embed

# Prefixes under which big_vision / vit_jax checkpoints keep the tower.
_AUGREG_PREFIXES = ("params/img/", "params/", "opt/target/", "")
# The pre-logits layer of the ViT-paper weights is not part of the tower (as the AugReg one).
_TIMM_SKIP = re.compile(r"^(head|pre_logits)\.")
_AUGREG_SKIP = re.compile(r"^(head|pre_logits)/")


def detect_layout(arrays: Mapping[str, np.ndarray]) -> str:
  """'timm' for a timm `VisionTransformer` state dict, 'augreg' for an AugReg/big_vision npz."""
  if "patch_embed.proj.weight" in arrays:
    return "timm"
  if any(p + "embedding/kernel" in arrays for p in _AUGREG_PREFIXES):
    return "augreg"
  some = ", ".join(sorted(arrays)[:8])
  raise WeightMismatchError(
      "not a timm ViT state dict (no 'patch_embed.proj.weight') nor an AugReg/big_vision npz "
      f"(no 'embedding/kernel'); the file has {len(arrays)} arrays, e.g. {some}")


def _need(arrays: Mapping[str, np.ndarray], key: str, layout: str) -> np.ndarray:
  if key not in arrays:
    raise WeightMismatchError(f"{layout} checkpoint does not match a ViT:\n  - missing   {key}")
  return np.asarray(arrays[key])


def _square_grid(rows: int, grid: Optional[Sequence[int]]) -> tuple[tuple[int, int], bool]:
  """Grid of a position table with `rows` rows, and whether it has a class row."""
  if grid is not None:
    grid = (int(grid[0]), int(grid[1]))
    n = grid[0] * grid[1]
    if rows not in (n, n + 1):
      raise WeightMismatchError(f"position embedding has {rows} rows; a {grid[0]}x{grid[1]} grid "
                                f"needs {n + 1} (or {n} without a class row)")
    return grid, rows == n + 1
  for with_cls in (True, False):
    n = rows - int(with_cls)
    side = math.isqrt(max(n, 0))
    if n > 0 and side * side == n:
      return (side, side), with_cls
  raise WeightMismatchError(f"position embedding has {rows} rows, which is no square grid (with or "
                            "without a class row); pass grid=(rows, cols)")


def _augreg_normalise(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """AugReg/big_vision variants -> the classic vit_jax names, unprefixed and unscanned.

  big_vision's ViT names block parts LayerNorm_0/MultiHeadDotProductAttention_0/
  LayerNorm_1/MlpBlock_0, keeps `pos_embedding` at the top without a class row
  (its class token gets no position embedding, i.e. a zero row), and may stack
  blocks on a leading axis under `Transformer/encoderblock/`.
  """
  prefix = next(p for p in _AUGREG_PREFIXES if p + "embedding/kernel" in arrays)
  src = {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
  scanned = {k: v for k, v in src.items() if k.startswith("Transformer/encoderblock/")}
  out = {k: v for k, v in src.items() if k not in scanned}
  for k, v in scanned.items():
    rest = k[len("Transformer/encoderblock/"):]
    for i in range(v.shape[0]):
      out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
  big_vision = "pos_embedding" in out or any(
      "/MultiHeadDotProductAttention_0/" in k for k in out)
  if big_vision:
    renames = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
               "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
    fixed = {}
    for k, v in out.items():
      m = re.match(r"^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$", k)
      if m and m.group(2) in renames:
        k = m.group(1) + renames[m.group(2)] + m.group(3)
      fixed[k] = v
    out = fixed
    if "pos_embedding" in out:
      pe = out.pop("pos_embedding")
      out["Transformer/posembed_input/pos_embedding"] = pe
  return out


def _with_class_row(pe: np.ndarray, has_cls: bool) -> np.ndarray:
  """(1, [1+]N, D) -> (1, 1+N, D); a missing class row means the class token gets none (zeros)."""
  pe = pe.reshape(1, -1, pe.shape[-1])
  if has_cls:
    return pe
  return np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)


def infer_config(arrays: Mapping[str, np.ndarray], *, heads: Optional[int] = None,
                 grid: Optional[Sequence[int]] = None) -> ViTConfig:
  """Architecture from the shapes of a timm or AugReg checkpoint.

  Heads: AugReg files store them (query kernel (D, heads, head_dim)); timm
  files fuse q, k, v, so heads default to width // 64 unless given. The grid
  is taken as square unless `grid` is given.
  """
  layout = detect_layout(arrays)
  if layout == "timm":
    w = _need(arrays, "patch_embed.proj.weight", layout)  # (D, C, p, p)
    width, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(m.group(1)) for k in arrays
                     if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
      raise WeightMismatchError("timm checkpoint does not match a ViT:\n  - missing   blocks.0.*")
    mlp_dim = _need(arrays, "blocks.0.mlp.fc1.weight", layout).shape[0]
    rows = _need(arrays, "pos_embed", layout).reshape(-1, width).shape[0]
    n_heads = heads or max(width // 64, 1)
  else:
    a = _augreg_normalise(arrays)
    kernel = _need(a, "embedding/kernel", layout)  # (p, p, C, D)
    patch, in_chans, width = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    depth = 1 + max((int(m.group(1)) for k in a
                     if (m := re.match(r"^Transformer/encoderblock_(\d+)/", k))), default=-1)
    if depth == 0:
      raise WeightMismatchError(
          "AugReg checkpoint does not match a ViT:\n  - missing   Transformer/encoderblock_0/*")
    mlp_dim = _need(a, "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", layout).shape[-1]
    q = _need(a, "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel", layout)
    n_heads = heads or (q.shape[1] if q.ndim == 3 else max(width // 64, 1))
    rows = _need(a, "Transformer/posembed_input/pos_embedding", layout).reshape(-1, width).shape[0]
  if width % n_heads:
    raise WeightMismatchError(f"width {width} is not divisible by {n_heads} heads")
  g, _ = _square_grid(rows, grid)
  return ViTConfig(patch=int(patch), width=int(width), depth=int(depth), heads=int(n_heads),
                   mlp_dim=int(mlp_dim), grid=g, in_chans=int(in_chans))


def _variables(flat: dict[str, np.ndarray]) -> dict:
  return {"params": {"img": unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})}}


def timm_shapes(config: ViTConfig) -> dict[str, tuple]:
  """Names and shapes of a timm `VisionTransformer` state dict for `config` (head excluded)."""
  d, m, p, c = config.width, config.mlp_dim, config.patch, config.in_chans
  n = config.grid[0] * config.grid[1]
  out = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d),
         "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
         "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(config.depth):
    b = f"blocks.{i}."
    out.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (m, d), b + "mlp.fc1.bias": (m,),
                b + "mlp.fc2.weight": (d, m), b + "mlp.fc2.bias": (d,)})
  return out


def augreg_shapes(config: ViTConfig) -> dict[str, tuple]:
  """Names and shapes of a classic AugReg/vit_jax npz for `config` (head excluded)."""
  d, m, p, c, h = config.width, config.mlp_dim, config.patch, config.in_chans, config.heads
  hd = d // h
  n = config.grid[0] * config.grid[1]
  out = {"cls": (1, 1, d), "embedding/kernel": (p, p, c, d), "embedding/bias": (d,),
         "Transformer/posembed_input/pos_embedding": (1, n + 1, d),
         "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,)}
  for i in range(config.depth):
    b = f"Transformer/encoderblock_{i}/"
    a = b + "MultiHeadDotProductAttention_1/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      out.update({f"{b}{ln}/scale": (d,), f"{b}{ln}/bias": (d,)})
    for t in ("query", "key", "value"):
      out.update({f"{a}{t}/kernel": (d, h, hd), f"{a}{t}/bias": (h, hd)})
    out.update({a + "out/kernel": (h, hd, d), a + "out/bias": (d,),
                b + "MlpBlock_3/Dense_0/kernel": (d, m), b + "MlpBlock_3/Dense_0/bias": (m,),
                b + "MlpBlock_3/Dense_1/kernel": (m, d), b + "MlpBlock_3/Dense_1/bias": (d,)})
  return out


def from_timm(state_dict: Mapping[str, np.ndarray], config: ViTConfig) -> dict:
  """timm `VisionTransformer` state dict -> `{'params': {'img': ...}}`."""
  sd = {k: np.asarray(v) for k, v in state_dict.items() if not _TIMM_SKIP.match(k)}
  if "pos_embed" in sd:  # no_embed_class models: the class token has no position row
    n = config.grid[0] * config.grid[1]
    sd["pos_embed"] = _with_class_row(sd["pos_embed"], sd["pos_embed"].size // config.width != n)
  check_names_and_shapes(timm_shapes(config), sd, "timm ViT state dict")
  out = {"cls_token": sd["cls_token"], "pos_embed": sd["pos_embed"],
         "patch_embed/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "patch_embed/bias": sd["patch_embed.proj.bias"],
         "norm/scale": sd["norm.weight"], "norm/bias": sd["norm.bias"]}
  for i in range(config.depth):
    s, t = f"blocks.{i}.", f"blocks_{i}/"
    pairs = {"norm1": "ln_1", "norm2": "ln_2"}
    for a, b in pairs.items():
      out[f"{t}{b}/scale"] = sd[f"{s}{a}.weight"]
      out[f"{t}{b}/bias"] = sd[f"{s}{a}.bias"]
    dense = {"attn.qkv": "attn/qkv", "attn.proj": "attn/out", "mlp.fc1": "mlp/fc1",
             "mlp.fc2": "mlp/fc2"}
    for a, b in dense.items():
      out[f"{t}{b}/kernel"] = sd[f"{s}{a}.weight"].T  # torch Linear is (out, in)
      out[f"{t}{b}/bias"] = sd[f"{s}{a}.bias"]
  return _variables(out)


def from_augreg(npz_arrays: Mapping[str, np.ndarray], config: ViTConfig) -> dict:
  """AugReg / big_vision ViT npz arrays -> `{'params': {'img': ...}}`."""
  a = {k: v for k, v in _augreg_normalise(npz_arrays).items() if not _AUGREG_SKIP.match(k)}
  key = "Transformer/posembed_input/pos_embedding"
  if key in a:
    n = config.grid[0] * config.grid[1]
    a[key] = _with_class_row(a[key], a[key].size // config.width != n)
  check_names_and_shapes(augreg_shapes(config), a, "AugReg ViT npz")
  d = config.width
  out = {"cls_token": a["cls"], "pos_embed": a[key],
         "patch_embed/kernel": a["embedding/kernel"], "patch_embed/bias": a["embedding/bias"],
         "norm/scale": a["Transformer/encoder_norm/scale"],
         "norm/bias": a["Transformer/encoder_norm/bias"]}
  for i in range(config.depth):
    s, t = f"Transformer/encoderblock_{i}/", f"blocks_{i}/"
    mha = s + "MultiHeadDotProductAttention_1/"
    for ln, name in (("LayerNorm_0", "ln_1"), ("LayerNorm_2", "ln_2")):
      out[f"{t}{name}/scale"] = a[f"{s}{ln}/scale"]
      out[f"{t}{name}/bias"] = a[f"{s}{ln}/bias"]
    # (D, heads, head_dim) kernels flatten heads-major, the order of a fused torch qkv.
    qkv = ("query", "key", "value")
    out[t + "attn/qkv/kernel"] = np.concatenate(
        [a[f"{mha}{n}/kernel"].reshape(d, d) for n in qkv], axis=1)
    out[t + "attn/qkv/bias"] = np.concatenate([a[f"{mha}{n}/bias"].reshape(d) for n in qkv])
    out[t + "attn/out/kernel"] = a[mha + "out/kernel"].reshape(d, d)
    out[t + "attn/out/bias"] = a[mha + "out/bias"]
    for j, name in ((0, "fc1"), (1, "fc2")):
      out[f"{t}mlp/{name}/kernel"] = a[f"{s}MlpBlock_3/Dense_{j}/kernel"]
      out[f"{t}mlp/{name}/bias"] = a[f"{s}MlpBlock_3/Dense_{j}/bias"]
  return _variables(out)


def pre_logits_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
  """Names of a pre-logits (representation) layer: the original ViT-paper IN-21k weights
  have one (timm `pre_logits.fc.*`, vit_jax `pre_logits/*`); AugReg weights do not."""
  return sorted(k for k in arrays
                if k.startswith("pre_logits.") or any(k.startswith(p + "pre_logits/")
                                                       for p in _AUGREG_PREFIXES))


def head_info(arrays: Mapping[str, np.ndarray]) -> str:
  """A short note on the classifier/pre-logits layers a loader skips ('' if none)."""
  notes = []
  for k in ("head.weight", "head/kernel"):
    for p in _AUGREG_PREFIXES if "/" in k else ("",):
      if p + k in arrays:
        notes.append(f"classifier head {p + k} {tuple(np.shape(arrays[p + k]))}")
  for p in _AUGREG_PREFIXES:
    if p + "pre_logits/kernel" in arrays:
      notes.append(f"pre-logits layer {p}pre_logits/kernel")
  if "pre_logits.fc.weight" in arrays:
    notes.append("pre-logits layer pre_logits.fc.weight")
  return "; ".join(dict.fromkeys(notes))


def load_vit(source: Union[str, os.PathLike, Mapping[str, Any]], *,
             image_size: Union[None, int, Sequence[int]] = None, ln_eps: float = 1e-6,
             exact_gelu: bool = True, dtype: Dtype = jnp.float32, heads: Optional[int] = None,
             grid: Optional[Sequence[int]] = None, remat: bool = False,
             expected: Optional[str] = None, field: Optional[str] = None
             ) -> tuple[ViTModel, dict]:
  """Builds the tower from a timm state dict or an AugReg/big_vision `.npz`.

  Args:
    source: a weight file (.pt/.pth/.safetensors/.npz) or a dict of arrays.
    image_size: (H, W) the model will see; the position embedding is resized.
    ln_eps: LayerNorm epsilon (timm 1e-6; LPT builds its ViT with 1e-5).
    exact_gelu: erf GELU (torch nn.GELU, timm, LPT) or the tanh approximation.
    dtype: compute dtype (params stay float32).
    heads: number of heads; default width // 64 for timm files (AugReg files
      store it in their shapes).
    grid: the checkpoint's own patch grid when its position embedding is not
      square.
    remat: rematerialise the blocks in the backward pass (less memory).
    expected: what the caller's recipe expects (a sentence naming the weights);
      when given, a file with a pre-logits layer (the ViT-paper weights, not
      AugReg) raises a UserWarning naming the file and this expectation.
    field: the config field the path came from, named in the error messages.

  Returns:
    `(model, {'params': {'img': ...}})`. The classifier head (and an AugReg
    pre-logits layer) is not part of the tower and is dropped.
  """
  if isinstance(source, Mapping):
    arrays = {k: np.asarray(v) for k, v in source.items()}
    name = "weights"
  else:
    arrays = read_arrays(source, field=field)
    name = os.fspath(source)
  layout = detect_layout(arrays)
  config = infer_config(arrays, heads=heads, grid=grid)
  convert = from_timm if layout == "timm" else from_augreg
  variables = convert(arrays, config)
  dropped = head_info(arrays)
  if dropped:
    logging.info("load_vit: %s (%s layout): dropped %s", name, layout, dropped)
  pre = pre_logits_keys(arrays)
  if pre and expected:
    msg = (f"{name} has a pre-logits layer ({', '.join(pre)}): it looks like the original "
           f"ViT-paper weights, not what this recipe expects: {expected}. The pre-logits "
           "layer is dropped and the tower loads, but its features (and results) differ.")
    warnings.warn(msg, UserWarning, stacklevel=2)
    logging.warning("%s", msg)
  img = jax.tree.map(jnp.asarray, variables["params"]["img"])
  if image_size is not None:
    img, config = resize_pos_embed(img, config, image_size)
  model = ViTModel(img=ViT(config, ln_eps=ln_eps, exact_gelu=exact_gelu, dtype=dtype,
                           remat=remat))
  return model, {"params": {"img": img}}
