"""LPT (long-tailed prompt tuning) and VPT / linear-probe classifiers on the `ViT` tower.

Everything is functional over the parameter tree:

    params = {'img': <ViT params>,
              'prompt': {'shared': (L, T, D), 'group': (P, G, T, D), 'keys': (P, D)}   # LPT
                        {'deep': (L, T, D)} | {'shallow': (T, D)} | absent             # VPT / linear
              'head': {'kernel': (D, C)} (+ 'bias': (C,) for a linear head)}

ViT-B/16 LPT: L = 12, T = 10, D = 768, P = 20 group prompts, G = 6 (the last 6
blocks carry group prompts); prompts 92,160 + 921,600 = 1,013,760 (the paper's 1.01M).

Forward passes (DongSky/LPT phase2_test/PromptModels_pool/structure.py):

* `classifier_forward`: phase 1 (shared deep prompts in every block), VPT-deep,
  VPT-shallow or no prompt; final-LN class token -> dropout (training) -> head.
* `phase2_forward`: the query is the class token of the frozen phase-1 model
  (shared prompts only, no dropout, no gradient); cosine to the keys, top-k,
  mean of the selected group prompts, which go beside the shared prompt in the
  last G blocks. `fused=True` runs blocks 0..L-G once for both passes (they see
  identical inputs), the saving; `fused=False` is the reference's two
  full passes.
* `make_predict`: the fused inference as one jitted function;
  `make_two_pass_predict`: the reference's two separately compiled passes.

The cosine head ("NormedLinear") has no bias and no scale: logits are cosines in
[-1, 1]; the scale s = 20 lives in the loss (A-GCL).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.models.vit import ViT, ViTConfig

Array = jax.Array

METHODS = ("lpt", "vpt_deep", "vpt_shallow", "linear")
HEADS = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """What the classifier learns beside the frozen tower.

  method: 'lpt' (shared + group prompts + keys), 'vpt_deep', 'vpt_shallow' or
    'linear' (no prompt).
  prompt_length: tokens per layer (T), for the shared, group and VPT prompts.
  pool_size / group_layers / top_k: LPT's m = 20 group prompts, K = 6 last
    blocks, k = 2 selected per image.
  dropout: on the final feature in training (LPT 0.1).
  prompt_dropout: on the inserted VPT prompt tokens in training (VPT's
    PROMPT.DROPOUT; LPT uses none).
  head: 'cosine' (LPT's NormedLinear) or 'linear' (VPT's Linear with bias).
  prompt_init: 'trunc_normal' (LPT, std 0.02) or 'vpt_uniform' (VPT:
    uniform(-v, v), v = sqrt(6 / (3 * patch^2 + D))).
  """
  method: str = "lpt"
  num_classes: int = 1000
  prompt_length: int = 10
  pool_size: int = 20
  group_layers: int = 6
  top_k: int = 2
  dropout: float = 0.1
  prompt_dropout: float = 0.0
  head: str = "cosine"
  prompt_init: str = "trunc_normal"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
    if self.head not in HEADS:
      raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")
    if self.prompt_init not in ("trunc_normal", "vpt_uniform"):
      raise ValueError(f"unknown prompt_init {self.prompt_init!r}")
    if self.method == "lpt" and not 0 < self.top_k <= self.pool_size:
      raise ValueError(f"top_k {self.top_k} must be in [1, pool_size={self.pool_size}]")


# ============================================================== initialisation


def prompt_shapes(vit: ViTConfig, spec: PromptSpec) -> dict[str, tuple[int, ...]]:
  """Shapes of the `prompt` subtree ({} for a linear probe)."""
  t, d, depth = spec.prompt_length, vit.width, vit.depth
  if spec.method == "lpt":
    if not 0 < spec.group_layers <= depth:
      raise ValueError(f"group_layers {spec.group_layers} does not fit a {depth}-block tower")
    return {"shared": (depth, t, d), "group": (spec.pool_size, spec.group_layers, t, d),
            "keys": (spec.pool_size, d)}
  if spec.method == "vpt_deep":
    return {"deep": (depth, t, d)}
  if spec.method == "vpt_shallow":
    return {"shallow": (t, d)}
  return {}


def vpt_uniform_bound(vit: ViTConfig) -> float:
  """VPT's xavier-uniform bound with the patch fan-in: sqrt(6 / (C * p * p + D))."""
  return math.sqrt(6.0 / (vit.in_chans * vit.patch * vit.patch + vit.width))


def init_prompts(rng: jax.Array, vit: ViTConfig, spec: PromptSpec) -> dict[str, jax.Array]:
  """LPT: trunc_normal(std 0.02) (timm truncates at +-2 absolute, i.e. +-100 sigma);
  VPT: uniform(-v, v) with v = `vpt_uniform_bound` (0.0625 for ViT-B/16)."""
  shapes = prompt_shapes(vit, spec)
  out = {}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    key = jax.random.fold_in(rng, i)
    if spec.prompt_init == "trunc_normal":
      out[name] = 0.02 * jax.random.truncated_normal(key, -100.0, 100.0, shape, jnp.float32)
    else:
      v = vpt_uniform_bound(vit)
      out[name] = jax.random.uniform(key, shape, jnp.float32, -v, v)
  return out


def init_head(rng: jax.Array, width: int, num_classes: int, kind: str = "cosine"
              ) -> dict[str, jax.Array]:
  """Cosine head: uniform(-1, 1), each class column renormalised to unit norm, no bias.

  Linear head (VPT's `MLP` with no hidden layer): kaiming-normal weight with fan_out
  (std sqrt(2 / C)) and bias -log((1 - 0.01) / 0.01).
  """
  if kind == "cosine":
    w = jax.random.uniform(rng, (width, num_classes), jnp.float32, -1.0, 1.0)
    return {"kernel": w / jnp.linalg.norm(w, axis=0, keepdims=True)}
  if kind == "linear":
    std = math.sqrt(2.0 / num_classes)
    return {"kernel": std * jax.random.normal(rng, (width, num_classes), jnp.float32),
            "bias": jnp.full((num_classes,), -math.log((1 - 0.01) / 0.01), jnp.float32)}
  raise ValueError(f"unknown head {kind!r}")


def init_trainables(rng: jax.Array, vit: ViTConfig, spec: PromptSpec) -> dict:
  """{'prompt': ..., 'head': ...} (no 'prompt' key for a linear probe)."""
  r_prompt, r_head = jax.random.split(rng)
  out = {"head": init_head(r_head, vit.width, spec.num_classes, spec.head)}
  prompts = init_prompts(r_prompt, vit, spec)
  if prompts:
    out["prompt"] = prompts
  return out


def param_shapes(vit_module: ViT, spec: PromptSpec) -> dict:
  """The full parameter tree as ShapeDtypeStructs, without allocating anything."""
  c = vit_module.config
  images = jax.ShapeDtypeStruct((1, *c.image_size, c.in_chans), jnp.float32)

  def init(rng):
    img = vit_module.init(rng, jnp.zeros(images.shape, images.dtype))["params"]
    return {"img": img, **init_trainables(rng, c, spec)}

  return jax.eval_shape(init, jax.random.key(0))


def count(tree: Any) -> int:
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def parameter_counts(params: Mapping, spec: PromptSpec) -> dict[str, int]:
  """Per-group counts (arrays or ShapeDtypeStructs); 'prompts' excludes keys and head,
  the way the paper's "1.01M" is counted."""
  prompt = params.get("prompt", {})
  out = {name: count(v) for name, v in prompt.items()}
  out["prompts"] = sum(v for k, v in out.items() if k != "keys")
  out["head"] = count(params.get("head", {}))
  out["backbone"] = count(params.get("img", {}))
  if spec.method == "lpt":
    out["phase1_trainable"] = out["shared"] + out["head"]
    out["phase2_trainable"] = out["group"] + out["keys"] + out["head"]
  else:
    out["trainable"] = out["prompts"] + out["head"]
  return out


# ============================================================== pieces


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout (torch `nn.Dropout` in training); identity without rng or rate."""
  if not rate or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def head_logits(head: Mapping[str, jax.Array], feature: jax.Array, kind: str = "cosine"
                ) -> jax.Array:
  """Cosine head: normalize(f) . normalize(W[:, c]) in [-1, 1]; linear: f W + b."""
  feature = feature.astype(jnp.float32)
  kernel = jnp.asarray(head["kernel"], jnp.float32)
  if kind == "cosine":
    return l2_normalize(feature) @ l2_normalize(kernel, axis=0)
  return feature @ kernel + jnp.asarray(head["bias"], jnp.float32)


def _v(params: Mapping) -> dict:
  return {"params": params["img"]}


def group_prompt(group: jax.Array, indices: jax.Array) -> jax.Array:
  """Mean of the selected group prompts: (P, G, T, D)[(B, k)] -> (B, G, T, D)."""
  return jnp.mean(jnp.take(group, indices, axis=0), axis=1)


# ============================================================== forwards


def classifier_forward(vit: ViT, params: Mapping, images: jax.Array, spec: PromptSpec, *,
                       rng: Optional[jax.Array] = None, return_feature: bool = False):
  """Phase-1 LPT ('lpt': shared prompts only), VPT-deep/shallow or linear probe.

  rng given -> training: feature dropout (and VPT prompt dropout). Returns logits
  (B, C) float32, or (logits, feature) with `return_feature`.
  """
  r_feat, r_prompt = (None, None) if rng is None else tuple(jax.random.split(rng))
  prompt = params.get("prompt", {})
  b = images.shape[0]
  deep = shallow = None
  if spec.method == "lpt":
    deep = prompt["shared"]
  elif spec.method == "vpt_deep":
    deep = prompt["deep"]
    if spec.prompt_dropout and r_prompt is not None:
      deep = dropout(jnp.broadcast_to(deep, (b, *deep.shape)), spec.prompt_dropout, r_prompt)
  elif spec.method == "vpt_shallow":
    shallow = prompt["shallow"]
    if spec.prompt_dropout and r_prompt is not None:
      shallow = dropout(jnp.broadcast_to(shallow, (b, *shallow.shape)), spec.prompt_dropout,
                        r_prompt)
  feature = vit.apply(_v(params), images, prompts=deep, shallow_prompts=shallow)
  logits = head_logits(params["head"], dropout(feature, spec.dropout, r_feat), spec.head)
  return (logits, feature) if return_feature else logits


def phase2_forward(vit: ViT, params: Mapping, images: jax.Array, spec: PromptSpec, *,
                   rng: Optional[jax.Array] = None, fused: bool = True) -> dict[str, jax.Array]:
  """LPT phase 2 (and LPT inference).

  Returns {'logits' (B, C) cosines, 'similarity' (B, P) query-key cosines
  (differentiable in the keys), 'indices' (B, k) selected group prompts, 'feature'
  (B, D) pre-dropout feature, 'query' (B, D)}.
  """
  prompt = params["prompt"]
  shared = jax.lax.stop_gradient(prompt["shared"])  # frozen in phase 2
  depth = vit.config.depth
  split_at = depth - spec.group_layers
  v = _v(params)
  v_frozen = jax.lax.stop_gradient(v)
  if fused:
    # Blocks 0..split_at-1 see the same tokens in the query pass and the main pass.
    x = vit.apply(v_frozen, images, method="embed")
    h = vit.apply(v_frozen, x, shared, start=0, stop=split_at, method="run_blocks")
    query = vit.apply(v_frozen, vit.apply(v_frozen, h, shared, start=split_at,
                                          method="run_blocks"), method="head_feature")
  else:
    query = vit.apply(v_frozen, images, prompts=shared)
  query = jax.lax.stop_gradient(query)
  indices, similarity = select_prompts(query, prompt["keys"], spec.top_k)
  group = group_prompt(prompt["group"], indices)
  if fused:
    out = vit.apply(v, h, (shared, group), prompt_start=(0, split_at), start=split_at,
                    method="run_blocks")
    feature = vit.apply(v, out, method="head_feature")
  else:
    feature = vit.apply(v, images, prompts=(shared, group), prompt_start=(0, split_at))
  logits = head_logits(params["head"], dropout(feature, spec.dropout, rng), spec.head)
  return {"logits": logits, "similarity": similarity, "indices": indices, "feature": feature,
          "query": query}


def forward(vit: ViT, params: Mapping, images: jax.Array, spec: PromptSpec, *, phase: int = 2,
            rng: Optional[jax.Array] = None) -> jax.Array:
  """Logits of any method; LPT uses the phase-2 model when `phase == 2`."""
  if spec.method == "lpt" and phase == 2:
    return phase2_forward(vit, params, images, spec, rng=rng)["logits"]
  return classifier_forward(vit, params, images, spec, rng=rng)


def make_predict(vit: ViT, spec: PromptSpec, *, phase: int = 2, fused: bool = True
                 ) -> Callable[[Mapping, jax.Array], dict[str, jax.Array]]:
  """One jitted inference function `(params, images) -> {'logits', 'pred', ...}`.

  For LPT phase 2 the result also holds 'indices' (selected group prompts) and
  'feature'; with `fused=True` the first depth - G blocks run once.
  """

  def predict(params, images):
    if spec.method == "lpt" and phase == 2:
      out = phase2_forward(vit, params, images, spec, fused=fused)
      out = {k: out[k] for k in ("logits", "indices", "feature")}
    else:
      logits, feature = classifier_forward(vit, params, images, spec, return_feature=True)
      out = {"logits": logits, "feature": feature}
    out["pred"] = jnp.argmax(out["logits"], axis=-1).astype(jnp.int32)
    return out

  return jax.jit(predict)


def make_two_pass_predict(vit: ViT, spec: PromptSpec
                          ) -> Callable[[Mapping, jax.Array], dict[str, jax.Array]]:
  """The reference's LPT inference: a query pass and a full prompted pass, as two
  separately compiled functions (inside one jit XLA would merge their common first
  blocks, which is what `make_predict(fused=True)` does explicitly)."""
  if spec.method != "lpt":
    raise ValueError("two-pass inference is LPT's")
  split_at = vit.config.depth - spec.group_layers

  @jax.jit
  def query_pass(params, images):
    return vit.apply(_v(params), images, prompts=params["prompt"]["shared"])

  @jax.jit
  def main_pass(params, images, query):
    prompt = params["prompt"]
    indices, _ = select_prompts(query, prompt["keys"], spec.top_k)
    group = group_prompt(prompt["group"], indices)
    feature = vit.apply(_v(params), images, prompts=(prompt["shared"], group),
                        prompt_start=(0, split_at))
    logits = head_logits(params["head"], feature, spec.head)
    return {"logits": logits, "indices": indices, "feature": feature,
            "pred": jnp.argmax(logits, axis=-1).astype(jnp.int32)}

  def predict(params, images):
    return main_pass(params, images, query_pass(params, images))

  return predict


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps), as `torch.nn.functional.normalize`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def select_prompts(query: Array, keys: Array, k: int = 2) -> Tuple[Array, Array]:
  """Cosine similarity of queries (B, D) to keys (M, D) and the top-k key indices.

  Returns (indices (B, k) int32, best first; similarity (B, M)). The similarity stays
  differentiable in `keys` so that `matching_loss` can train them; the indices carry
  no gradient.
  """
  if k > keys.shape[0]:
    raise ValueError(f"top-{k} requested from a pool of {keys.shape[0]} keys")
  sim = l2_normalize(query) @ l2_normalize(keys).T
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(sim), k)
  return idx.astype(jnp.int32), sim
