"""The authors' released CLIP-ReID checkpoints -> jaxprompt trees.

    clip_model, params, model_state, info = convert("Market1501_clipreid_ViT-B-16_60.pth",
                                                    image_size=(256, 128))

Two layouts are read (Syliz517/CLIP-ReID):

* CLIP-ReID (`model/make_model_clipreid.py`): `image_encoder.*` (the CLIP image
  tower, OpenAI names, position embedding already resized to the training
  grid), `text_encoder.{transformer.*, positional_embedding, ln_final.*,
  text_projection}` (no token embedding: the reference keeps it out of the
  model), `prompt_learner.cls_ctx` (N, 4, 512) and its fixed buffers
  `prompt_learner.token_prefix` (1, 5, 512) / `token_suffix` (1, ctx - 9, 512),
  `bottleneck[_proj].*`, `classifier[_proj].weight`, and `cv_embed` with SIE.
* the baseline (`model/make_model.py`): the same without the text side.

Result trees:

    params = {'img': ..., 'txt': ...,                     # as load_clip (txt: CLIP-ReID only)
              'prompt': {'cls_ctx': (N, 4, w), 'sie': (rows, in_planes)},   # those present
              'head': {'bottleneck': {'scale'}, 'bottleneck_proj': {'scale'},
                       'classifier': {'kernel'}, 'classifier_proj': {'kernel'}}}
    model_state = {'batch_stats': {'img': ... (RN only),
                                   'head': {'bottleneck': {'mean', 'var'}, ...}}}

`ReIDHead` has no BatchNorm bias (the reference freezes it at 0); a checkpoint
whose bias is not ~0 gives a warning. The text tower's token embedding is not in
the file: pass `clip_weights` (the OpenAI CLIP file the run started from) to fill
it, otherwise only the rows of the template's tokens are known (recovered from
the prompt buffers) and every other row is NaN, so misuse is loud.
`info['text_prompt']` is the `TextPrompt` rebuilt from the buffers themselves.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxprompt import precision
from jaxprompt.clipreid.model import TEMPLATES, TextPrompt
from jaxprompt.clipreid.config import _is_vit
from jaxprompt.convert import io
from jaxprompt.convert.io import (WeightMismatchError, check_names_and_shapes, flatten,
                                  read_arrays, unflatten)
from jaxprompt.convert.openai_clip import clean_state_dict, infer_config, to_variables, torch_name
from jaxprompt.models.clip import CLIP, CLIPConfig, init_shapes
from jaxprompt.tokenizer import tokenize

IMG, TXT = "image_encoder.", "text_encoder."
PROMPT = "prompt_learner."
NUM_ID_TOKENS = 4
PREFIX_LEN = 5
# OpenAI CLIP's text tower, for baseline files (no text side) without clip_weights.
_OPENAI_TEXT = dict(context_length=77, vocab_size=49408, text_width=512, text_heads=8,
                    text_layers=12)
_BN_BIAS_TOL = 1e-6
_IGNORED_SUFFIXES = (".num_batches_tracked", ".attn_mask")


def _read(source) -> tuple[dict[str, np.ndarray], str]:
  return io.read_state_dict(source)


def _count(sd: Mapping[str, Any], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return len({m.group(1) for k in sd if (m := pat.match(k))})


def _backbone_name(name: Optional[str]) -> Optional[str]:
  if name is None:
    return None
  n = name.lower().replace("-", "").replace("_", "").replace("/", "")
  if n.startswith("vit"):
    return "vit"
  if n.startswith(("rn", "resnet")):
    return "resnet"
  raise ValueError(f"backbone must be 'ViT-B-16', 'RN50', 'vit' or 'resnet'; got {name!r}")


def _shape(sd: Mapping[str, np.ndarray], name: str, source: str) -> tuple[int, ...]:
  if name not in sd:
    raise WeightMismatchError(
        f"{source} is not a CLIP-ReID checkpoint: missing {name!r} "
        f"(first keys: {sorted(sd)[:8]})")
  return tuple(sd[name].shape)


def _vit_stride(rows: int, image_size: tuple[int, int], patch: int,
                stride: Optional[int]) -> int:
  """The patch stride whose token grid at `image_size` has `rows - 1` tokens."""
  if stride is not None:
    return stride
  h, w = image_size
  fits = [s for s in range(patch, 0, -1) if h >= patch and w >= patch
          and ((h - patch) // s + 1) * ((w - patch) // s + 1) + 1 == rows]
  if patch in fits:
    return patch
  if len(fits) == 1:
    return fits[0]
  if not fits:
    raise WeightMismatchError(
        f"{IMG}positional_embedding has {rows} rows, which no patch stride gives for "
        f"{h}x{w} images; pass the INPUT.SIZE_TRAIN the checkpoint was trained with as image_size")
  raise WeightMismatchError(f"{IMG}positional_embedding has {rows} rows, which strides {fits} "
                            f"all give for {h}x{w} images; pass patch_stride")


def _rn_last_stride(rows: int, config: CLIPConfig, image_size, last_stride) -> int:
  if last_stride is not None:
    return last_stride
  for ls in (1, 2):  # CLIP-ReID always trains with layer4 stride 1
    g = config.with_input(image_size, last_stride=ls).grid
    if g[0] * g[1] + 1 == rows:
      return ls
  raise WeightMismatchError(
      f"{IMG}attnpool.positional_embedding has {rows} rows, which neither last stride 1 nor 2 "
      f"gives for {image_size[0]}x{image_size[1]} images; pass the INPUT.SIZE_TRAIN the "
      "checkpoint was trained with as image_size")


def _torch_shape(flax_shape: Sequence[int], perm: Optional[Sequence[int]]) -> tuple[int, ...]:
  if perm is None:
    return tuple(flax_shape)
  out = [0] * len(perm)
  for i, p in enumerate(perm):  # flax_shape[i] = torch_shape[perm[i]]
    out[p] = flax_shape[i]
  return tuple(out)


def _template_ids(context_length: int) -> dict[str, np.ndarray]:
  return {k: tokenize([t], context_length=context_length)[0] for k, t in TEMPLATES.items()}


def convert(state_dict_or_path: Union[str, os.PathLike, Mapping[str, Any]], *,
            image_size: Sequence[int],
            patch_stride: Optional[int] = None,
            last_stride: Optional[int] = None,
            backbone: Optional[str] = None,
            clip_weights: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
            ) -> tuple[CLIP, dict, dict, dict]:
  """Converts a released CLIP-ReID (or CLIP-ReID baseline) checkpoint.

  Args:
    state_dict_or_path: the `.pth` file, or its state dict (torch tensors or
      numpy arrays; a `module.` prefix is stripped).
    image_size: (H, W) = the run's INPUT.SIZE_TRAIN, e.g. (256, 128); the file's
      position embedding must fit it.
    patch_stride: ViT patch stride (MODEL.STRIDE_SIZE[0]); default: the one whose
      grid fits the stored position embedding (16, else e.g. 12 for OLP).
    last_stride: RN layer4 stride; default: the one that fits (1 in CLIP-ReID).
    backbone: 'ViT-B-16' / 'RN50' to check the file against; default: detected.
    clip_weights: optional OpenAI CLIP weights (path or dict) providing the text
      token embedding (and logit scale), which the checkpoint does not store.

  Returns:
    `(clip_model, params, model_state, info)`. `info` holds 'kind' ('clipreid' or
    'baseline'), 'backbone', 'num_ids', 'sie_rows', 'grid', 'image_size',
    'patch_stride', 'last_stride', 'in_planes', 'ignored' (file names not
    converted), 'text_prompt' (`TextPrompt` from the buffers, or None),
    'template' ('person'/'vehicle' when known), 'bn_bias_max', 'notes'.

  Raises:
    WeightMismatchError: with a diff of missing / unexpected / misshapen names,
      in the file's own names.
  """
  sd_raw, source = _read(state_dict_or_path)
  ignored = sorted(k for k in sd_raw if k.endswith(_IGNORED_SUFFIXES))
  sd = clean_state_dict(sd_raw)
  notes: list[str] = []

  # -- architecture, from the shapes ---------------------------------------------------------
  if IMG + "proj" in sd:
    vision = "vit"
  elif IMG + "attnpool.positional_embedding" in sd:
    vision = "resnet"
  else:
    hint = (" (this looks like an OpenAI/open_clip CLIP file: use jaxprompt.convert.openai_clip.load_clip)"
            if "visual.proj" in sd or "visual.attnpool.positional_embedding" in sd else "")
    raise WeightMismatchError(
        f"{source} is not a CLIP-ReID checkpoint: no {IMG}proj (ViT) nor "
        f"{IMG}attnpool.positional_embedding (RN){hint}; first keys: {sorted(sd)[:8]}")
  wanted_backbone = _backbone_name(backbone)
  if wanted_backbone is not None and wanted_backbone != vision:
    raise WeightMismatchError(f"{source} holds a {vision} image encoder, not {backbone!r}")
  kind = "clipreid" if any(k.startswith((TXT, PROMPT)) for k in sd) else "baseline"

  clip_sd = None
  if clip_weights is not None:
    clip_sd, _ = _read(clip_weights)
    clip_sd = clean_state_dict(clip_sd)
  if kind == "clipreid":
    tw = _shape(sd, TXT + "ln_final.weight", source)[0]
    text = dict(context_length=_shape(sd, TXT + "positional_embedding", source)[0],
                vocab_size=_OPENAI_TEXT["vocab_size"], text_width=tw, text_heads=tw // 64,
                text_layers=_count(sd, TXT + "transformer.resblocks"))
    embed_dim = _shape(sd, TXT + "text_projection", source)[1]
    if clip_sd is not None:
      text["vocab_size"] = _shape(clip_sd, "token_embedding.weight", "clip_weights")[0]
  elif clip_sd is not None:
    c = infer_config(clip_sd)
    text = dict(context_length=c.context_length, vocab_size=c.vocab_size,
                text_width=c.text_width, text_heads=c.text_heads, text_layers=c.text_layers)
    embed_dim = c.embed_dim
  else:
    text = dict(_OPENAI_TEXT)
    embed_dim = None

  if vision == "vit":
    width, _, _, patch = _shape(sd, IMG + "conv1.weight", source)
    if embed_dim is None:
      embed_dim = _shape(sd, IMG + "proj", source)[1]
    # pretrained_grid: OpenAI's 224-pixel grid, which the reference resized from; the file
    # itself stores the training grid, so this config is always used with an image_size.
    base = CLIPConfig(embed_dim=embed_dim, vision="vit", vision_width=width,
                      vision_layers=_count(sd, IMG + "transformer.resblocks"),
                      vision_heads=width // 64, patch_size=patch,
                      pretrained_grid=max(224 // patch, 1), **text)
    stride = _vit_stride(_shape(sd, IMG + "positional_embedding", source)[0],
                         tuple(image_size), patch, patch_stride)
    config = base.with_input(image_size, patch_stride=stride)
    in_planes = width
  else:
    width = _shape(sd, IMG + "layer1.0.conv1.weight", source)[0]
    if embed_dim is None:
      embed_dim = _shape(sd, IMG + "attnpool.c_proj.weight", source)[0]
    base = CLIPConfig(embed_dim=embed_dim, vision="resnet", vision_width=width,
                      vision_layers=tuple(_count(sd, f"{IMG}layer{i}") for i in range(1, 5)),
                      vision_heads=width * 32 // 64, patch_size=32, pretrained_grid=7, **text)
    ls = _rn_last_stride(_shape(sd, IMG + "attnpool.positional_embedding", source)[0], base,
                         tuple(image_size), last_stride)
    config = base.with_input(image_size, last_stride=ls)
    in_planes = width * 32

  # -- expected names (file names) -> flax names ----------------------------------------------
  table: dict[str, tuple[str, Optional[tuple[int, ...]]]] = {}
  want: dict[str, tuple[int, ...]] = {}
  for fname, leaf in flatten(init_shapes(config)).items():
    tname, perm = torch_name(fname, len(leaf.shape))
    if fname.startswith(("params/img/", "batch_stats/img/")):
      tname = IMG + tname[len("visual."):]
    elif tname in ("token_embedding.weight", "logit_scale"):
      continue  # not in CLIP-ReID checkpoints; filled below
    elif kind == "clipreid":
      tname = TXT + tname
    else:
      continue
    table[tname] = (fname, perm)
    want[tname] = _torch_shape(leaf.shape, perm)

  num_ids = 0
  for name in ("classifier.weight", "classifier_proj.weight", PROMPT + "cls_ctx"):
    if name in sd and sd[name].ndim >= 1:
      num_ids = int(sd[name].shape[0])
      break
  head_names = {"classifier.weight": (num_ids, in_planes),
                "classifier_proj.weight": (num_ids, embed_dim)}
  for bn, n in (("bottleneck", in_planes), ("bottleneck_proj", embed_dim)):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      head_names[f"{bn}.{leaf}"] = (n,)
  want.update(head_names)
  sie_rows = 0
  if "cv_embed" in sd:
    sie_rows = int(sd["cv_embed"].shape[0])
    want["cv_embed"] = (sie_rows, in_planes)
  if kind == "clipreid":
    tw, ctx = config.text_width, config.context_length
    want[PROMPT + "cls_ctx"] = (num_ids, NUM_ID_TOKENS, tw)
    want[PROMPT + "token_prefix"] = (1, PREFIX_LEN, tw)
    want[PROMPT + "token_suffix"] = (1, ctx - PREFIX_LEN - NUM_ID_TOKENS, tw)
  got = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length",
                                                   "vocab_size")}
  try:
    check_names_and_shapes(want, got, source)
  except WeightMismatchError as e:
    msg = str(e)
    if any(s in msg for s in ("positional_embedding", "conv1.weight")):
      msg += (f"\n  (model built for {tuple(image_size)} images, grid {config.grid}"
              + (f", patch stride {config.stride}" if vision == "vit" else
                 f", last stride {config.last_stride}")
              + "; use the checkpoint's INPUT.SIZE_TRAIN / MODEL.STRIDE_SIZE)")
    raise WeightMismatchError(msg) from None

  # -- towers ---------------------------------------------------------------------------------
  flat = {}
  for tname, (fname, perm) in table.items():
    a = np.asarray(sd[tname], np.float32)
    flat[fname] = np.transpose(a, perm) if perm is not None else a
  variables = unflatten(flat)
  params: dict[str, Any] = {"img": variables["params"]["img"]}
  model_state: dict[str, Any] = {"batch_stats": {}}
  if "batch_stats" in variables:
    model_state["batch_stats"]["img"] = variables["batch_stats"]["img"]

  # -- text side ------------------------------------------------------------------------------
  text_prompt, template = None, None
  if kind == "clipreid" or clip_sd is not None:
    txt = variables["params"].get("txt", {}) if kind == "clipreid" else {}
    if kind != "clipreid":
      # Baseline run: the text tower is the untouched CLIP one.
      cfg = infer_config(clip_sd)
      txt = dict(to_variables(clip_sd, cfg, source="clip_weights")["params"]["txt"])
      txt = {k: np.asarray(v) if not isinstance(v, dict) else v for k, v in txt.items()}
      notes.append("txt from clip_weights (baseline checkpoints have no text side)")
    else:
      txt, text_prompt, template = _fill_text(txt, sd, clip_sd, config, notes)
    params["txt"] = txt

  # -- prompts and heads ----------------------------------------------------------------------
  prompt = {}
  if kind == "clipreid":
    prompt["cls_ctx"] = np.asarray(sd[PROMPT + "cls_ctx"], np.float32)
  if sie_rows:
    prompt["sie"] = np.asarray(sd["cv_embed"], np.float32)
    if vision != "vit":
      notes.append("cv_embed present, but the reference never feeds SIE to RN towers")
  if prompt:
    params["prompt"] = prompt
  bias_max = max(float(np.abs(sd[f"{bn}.bias"]).max(initial=0.0))
                 for bn in ("bottleneck", "bottleneck_proj"))
  if bias_max > _BN_BIAS_TOL:
    warnings.warn(f"{source}: BNNeck bias is not zero (max |bias| {bias_max:.3g}); jaxprompt's "
                  "ReIDHead has no BatchNorm bias (the reference freezes it at 0), so BN-neck "
                  "outputs and logits will differ (test features taken before the BN do not)",
                  stacklevel=2)
  params["head"] = {
      "bottleneck": {"scale": np.asarray(sd["bottleneck.weight"], np.float32)},
      "bottleneck_proj": {"scale": np.asarray(sd["bottleneck_proj.weight"], np.float32)},
      "classifier": {"kernel": np.asarray(sd["classifier.weight"], np.float32).T},
      "classifier_proj": {"kernel": np.asarray(sd["classifier_proj.weight"], np.float32).T},
  }
  model_state["batch_stats"]["head"] = {
      bn: {"mean": np.asarray(sd[f"{bn}.running_mean"], np.float32),
           "var": np.asarray(sd[f"{bn}.running_var"], np.float32)}
      for bn in ("bottleneck", "bottleneck_proj")}
  if kind == "clipreid":
    ignored += [PROMPT + "token_prefix", PROMPT + "token_suffix"]
  ignored += ["bottleneck.bias", "bottleneck_proj.bias"]

  info = {
      "kind": kind, "backbone": "ViT" if vision == "vit" else "RN", "num_ids": num_ids,
      "sie_rows": sie_rows, "grid": tuple(config.grid), "image_size": tuple(config.input_size),
      "patch_stride": config.stride if vision == "vit" else None,
      "last_stride": config.last_stride if vision != "vit" else None,
      "in_planes": in_planes, "embed_dim": embed_dim, "ignored": sorted(set(ignored)),
      "text_prompt": text_prompt, "template": template, "bn_bias_max": bias_max,
      "notes": notes, "config": config,
  }
  return CLIP(config), _to_jax(params), _to_jax(model_state), info


def _fill_text(txt: dict, sd: Mapping[str, np.ndarray],
               clip_sd: Optional[Mapping[str, np.ndarray]], config: CLIPConfig, notes: list[str]):
  """Token embedding + logit scale for the text tower, and the prompt from the buffers."""
  prefix = np.asarray(sd[PROMPT + "token_prefix"], np.float32)[0]
  suffix = np.asarray(sd[PROMPT + "token_suffix"], np.float32)[0]
  ctx, tw, vocab = config.context_length, config.text_width, config.vocab_size
  ids = _template_ids(ctx)
  eot = int(ids["person"].argmax())
  template = None
  txt = dict(txt)
  if clip_sd is not None:
    table = np.asarray(clip_sd["token_embedding.weight"], np.float32)
    if table.shape != (vocab, tw):
      raise WeightMismatchError(f"clip_weights token_embedding.weight {table.shape} does not fit "
                                f"the checkpoint's text tower (width {tw})")
    scale = np.asarray(clip_sd.get("logit_scale", math.log(1 / 0.07)), np.float32)
    for name, t in ids.items():
      if int(t.max()) < vocab:
        emb = table[t]
        if (np.allclose(emb[:PREFIX_LEN], prefix, atol=1e-5)
            and np.allclose(emb[PREFIX_LEN + NUM_ID_TOKENS:], suffix, atol=1e-5)):
          template = name
    if template is None:
      warnings.warn("the checkpoint's prompt buffers are not the clip_weights embeddings of "
                    "either CLIP-ReID template; are these the CLIP weights the run started from?",
                    stacklevel=3)
    notes.append("token_embedding and logit_scale from clip_weights")
  else:
    table = np.full((vocab, tw), np.nan, np.float32)
    rows: dict[int, list[np.ndarray]] = {}
    p = ids["person"]
    known = list(zip(p[:PREFIX_LEN], prefix)) + list(zip(p[PREFIX_LEN + NUM_ID_TOKENS:], suffix))
    # The class word ('person' / 'vehicle') sits at the first suffix position; the file
    # belongs to one of them, so both rows get it (the templates differ only there).
    known.append((ids["vehicle"][PREFIX_LEN + NUM_ID_TOKENS], suffix[0]))
    for i, row in known:
      rows.setdefault(int(i), []).append(row)
    for i, rs in rows.items():
      if any(not np.allclose(r, rs[0], atol=1e-6) for r in rs[1:]):
        warnings.warn(f"prompt buffers disagree on the embedding of token {i}", stacklevel=3)
      table[i] = rs[0]
    scale = np.asarray(math.log(1 / 0.07), np.float32)
    notes.append(f"token_embedding: only the {len(rows)} rows of the template tokens are known "
                 "(from the prompt buffers), the rest are NaN; pass clip_weights for the full "
                 "table. logit_scale is CLIP's initial value (CLIP-ReID never uses it)")
  txt["token_embedding"] = table
  txt["logit_scale"] = scale
  text_prompt = TextPrompt(prefix=jnp.asarray(prefix), suffix=jnp.asarray(suffix), eot_index=eot)
  return txt, text_prompt, template


def _to_jax(tree):
  return {k: _to_jax(v) if isinstance(v, Mapping) else jnp.asarray(v) for k, v in tree.items()}


__all__ = ["convert"]


def _strides_fitting(rows: int, size, patch: int) -> list[int]:
  """Patch strides whose token grid at `size` has `rows - 1` tokens."""
  h, w = size
  if h < patch or w < patch:
    return []
  return [s for s in range(patch, 0, -1)
          if ((h - patch) // s + 1) * ((w - patch) // s + 1) + 1 == rows]


def load_released(config) -> tuple[CLIP, dict, dict]:
  """(CLIP model, host variables, converter info) from `model.released_checkpoint`.

  The tower is built for this config (data.size, model.stride / last_stride); a file
  that does not fit raises a ValueError naming the config field to change. Variables:
  {'params': {'img', 'prompt'?, 'head'} (no text tower), 'batch_stats': {'img'?, 'head'}}.
  """
  path = config.model.released_checkpoint
  size = tuple(int(s) for s in config.data.size)
  sd, _ = io.read_state_dict(path, field="model.released_checkpoint")
  vit = _is_vit(config)
  if "image_encoder.proj" in sd or "image_encoder.attnpool.positional_embedding" in sd:
    file_vit = "image_encoder.proj" in sd
    if file_vit != vit:
      raise ValueError(f"{path} holds a {'ViT' if file_vit else 'ResNet'} image encoder but "
                       f"backbone={config.backbone!r}: set backbone="
                       f"{'vit_b16' if file_vit else 'rn50'!r}")
  kw = (dict(patch_stride=int(config.model.stride)) if vit
        else dict(last_stride=int(config.model.last_stride)))
  try:
    model, params, state, info = convert(sd, image_size=size, **kw)
  except WeightMismatchError as e:
    if "positional_embedding  model" not in str(e):
      raise  # not a grid mismatch: the converter's diff says what is wrong
    if vit:
      rows = int(sd["image_encoder.positional_embedding"].shape[0])
      patch = int(sd["image_encoder.conv1.weight"].shape[-1])
      fits = _strides_fitting(rows, size, patch)
      hint = (f"set model.stride={fits[0]}" if len(fits) == 1 else
              f"set model.stride to the checkpoint's MODEL.STRIDE_SIZE (one of {fits})" if fits
              else f"no patch stride fits data.size={list(size)}: set data.size to the "
                   "checkpoint's INPUT.SIZE_TRAIN")
      raise ValueError(
          f"{path}: its position embedding ({rows - 1} patches) does not fit model.stride="
          f"{config.model.stride} at data.size={list(size)}; {hint}") from None
    raise ValueError(
        f"{path}: its attention-pool grid does not fit data.size={list(size)} with "
        f"model.last_stride={config.model.last_stride}; set model.last_stride (CLIP-ReID "
        "trains with 1) or data.size to the checkpoint's INPUT.SIZE_TRAIN") from None
  model = CLIP(info["config"], dtype=precision.compute_dtype(config.precision))
  # Evaluation and extraction use the image side only; the text tower (whose token table is
  # mostly unknown without clip_weights) would just hold host memory.
  params = {k: v for k, v in params.items() if k != "txt"}
  variables = {"params": jax.device_get(params),
               "batch_stats": jax.device_get(state["batch_stats"])}
  for note in info["notes"]:
    logging.info("released checkpoint: %s", note)
  logging.info("released checkpoint %s: %s %s, %d identities, grid %s, SIE rows %d", path,
               info["kind"], info["backbone"], info["num_ids"], info["grid"], info["sie_rows"])
  return model, variables, info


def read_trained_params_file(path: str, field: Optional[str] = "model.trained_params"
                             ) -> tuple[dict, dict]:
  """(params, model_state) from a full params file ('params/...' and 'batch_stats/...');
  `field` is the config field named in read errors."""
  flat = read_arrays(path, field=field)
  if any(k.startswith(("params/", "batch_stats/")) for k in flat):
    tree = unflatten(flat)
    return tree.get("params", {}), ({"batch_stats": tree["batch_stats"]}
                                    if "batch_stats" in tree else {})
  return unflatten(flat), {}
