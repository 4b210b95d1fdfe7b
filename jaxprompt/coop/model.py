"""CoOp and CoCoOp prompt learners on a frozen CLIP (KaiyangZhou/CoOp trainers/coop.py,
trainers/cocoop.py).

Params tree: the CLIP towers as `load_clip` returns them (`img`, `txt`, with CLIP's
`logit_scale` at `txt/logit_scale`) plus the learned prompt under `prompt`:

    prompt/ctx                         (M, D) unified or (C, M, D) class-specific context
    prompt/meta_net/linear1/{kernel,bias}   CoCoOp only: D_img -> D_img // 16
    prompt/meta_net/linear2/{kernel,bias}   CoCoOp only: D_img // 16 -> D

Per class list, `ClassPrompts` holds the tokenised placeholder prompts
("X X ... X <name>." or "<init phrase> <name>.") as token ids; their embeddings are looked
up in the frozen token table at every forward, which equals the reference's
`token_prefix`/`token_suffix` buffers. Transfer to another class list is a new
`ClassPrompts`; the learned params do not change.

Sequences are cut after the last EOT of the class list (exact: the text mask is causal), and
the class axis can be encoded in chunks, each chunk's text pass rematerialised in the
backward pass, so the memory of CoCoOp on 1,000 classes stays bounded.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import tokenizer

POSITIONS = ("end", "middle", "front")
EOT_ID = 49407


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """The prompt learner's shape: `n_ctx` is overridden by the word count of `ctx_init`."""
  n_ctx: int = 16
  ctx_init: str = ""
  csc: bool = False
  class_token_position: str = "end"
  conditional: bool = False  # CoCoOp

  def resolved(self) -> "PromptSpec":
    """The reference's rules: an init phrase fixes M and disables CSC; CoCoOp is unified/end."""
    if self.class_token_position not in POSITIONS:
      raise ValueError(f"class_token_position must be one of {POSITIONS}, "
                       f"got {self.class_token_position!r}")
    init = self.ctx_init.replace("_", " ").strip()
    n_ctx = len(init.split(" ")) if init else int(self.n_ctx)
    if n_ctx < 1:
      raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    csc = bool(self.csc) and not init
    if self.conditional and (csc or self.class_token_position != "end"):
      raise ValueError("CoCoOp uses a unified context with the class token at the end "
                       "(csc=False, class_token_position='end')")
    return dataclasses.replace(self, n_ctx=n_ctx, ctx_init=init, csc=csc)


@dataclasses.dataclass(frozen=True)
class ClassPrompts:
  """Constants of one class list: token ids cut at the last EOT, EOT index, name lengths,
  and the gather order placing the class tokens (identity for 'end')."""
  classnames: tuple[str, ...]
  ids: np.ndarray        # (C, L) int32, L = max EOT index + 1
  eot: np.ndarray        # (C,) int32
  name_len: np.ndarray   # (C,) int32, BPE tokens of the name alone (no period)
  order: Optional[np.ndarray]  # (C, L) int32 or None for 'end'
  n_ctx: int
  position: str

  @property
  def num_classes(self) -> int:
    return len(self.classnames)

  @property
  def length(self) -> int:
    return int(self.ids.shape[1])


def clean_name(name: str) -> str:
  return name.replace("_", " ")


def placeholder_prefix(spec: PromptSpec) -> str:
  spec = spec.resolved()
  return spec.ctx_init if spec.ctx_init else " ".join(["X"] * spec.n_ctx)


def layout_order(position: str, n_ctx: int, name_len: Sequence[int], length: int) -> np.ndarray:
  """(C, length) gather indices from the 'end' layout [SOT, ctx, name, '.', EOT, pad...] to
  `position`'s layout. 'middle' puts floor(M/2) context tokens before the name."""
  rows = []
  m = n_ctx
  for nl in name_len:
    nl = int(nl)
    ctx = list(range(1, 1 + m))
    name = list(range(1 + m, 1 + m + nl))
    rest = list(range(1 + m + nl, length))
    if position == "end":
      row = [0] + ctx + name + rest
    elif position == "middle":
      h = m // 2
      row = [0] + ctx[:h] + name + ctx[h:] + rest
    elif position == "front":
      row = [0] + name + ctx + rest
    else:
      raise ValueError(f"class_token_position must be one of {POSITIONS}, got {position!r}")
    rows.append(row[:length])
  return np.asarray(rows, np.int32)


def build_class_prompts(classnames: Sequence[str], spec: PromptSpec, *,
                        context_length: int = 77, truncate: bool = True) -> ClassPrompts:
  """Tokenises "<placeholder> <name>." per class (CoOp trainers/coop.py, PromptLearner)."""
  spec = spec.resolved()
  if not classnames:
    raise ValueError("build_class_prompts: empty class list")
  names = [clean_name(n) for n in classnames]
  prefix = placeholder_prefix(spec)
  ids = tokenizer.tokenize([f"{prefix} {n}." for n in names], context_length=context_length)
  ids = np.asarray(ids, np.int32)
  eot = ids.argmax(-1).astype(np.int32)
  name_len = np.asarray([len(tokenizer.encode(n)) for n in names], np.int32)
  if spec.ctx_init:
    init_ids = tokenizer.encode(spec.ctx_init)
    if len(init_ids) != spec.n_ctx:
      raise ValueError(f"ctx_init {spec.ctx_init!r} has {spec.n_ctx} words but {len(init_ids)} "
                       f"BPE tokens; the reference assumes one token per word")
  length = int(eot.max()) + 1 if truncate else context_length
  ids = ids[:, :length]
  order = None if spec.class_token_position == "end" else layout_order(
      spec.class_token_position, spec.n_ctx, name_len, length)
  return ClassPrompts(tuple(classnames), ids, eot, name_len, order, spec.n_ctx,
                      spec.class_token_position)


# ----------------------------------------------------------------------------- params


def _torch_linear(rng: jax.Array, fan_in: int, fan_out: int) -> dict:
  """torch.nn.Linear's default init: weight and bias ~ U(+-1/sqrt(fan_in))."""
  kw, kb = jax.random.split(rng)
  bound = 1.0 / math.sqrt(fan_in)
  return {"kernel": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)}


def init_prompt(rng: jax.Array, spec: PromptSpec, *, width: int, embed_dim: int,
                num_classes: int = 0, token_embedding: Optional[jax.Array] = None) -> dict:
  """The `prompt` subtree: ctx (N(0, 0.02) or the init phrase's raw token embeddings) and,
  for CoCoOp, the Meta-Net Linear(E, E//16) -> ReLU -> Linear(E//16, D)."""
  spec = spec.resolved()
  k_ctx, k1, k2 = jax.random.split(rng, 3)
  if spec.ctx_init:
    if token_embedding is None:
      raise ValueError("ctx_init needs the CLIP token embedding table")
    ids = np.asarray(tokenizer.encode(spec.ctx_init), np.int32)
    ctx = jnp.asarray(token_embedding)[ids].astype(jnp.float32)
  elif spec.csc:
    if num_classes < 1:
      raise ValueError("class-specific context (csc=True) needs num_classes")
    ctx = 0.02 * jax.random.normal(k_ctx, (num_classes, spec.n_ctx, width), jnp.float32)
  else:
    ctx = 0.02 * jax.random.normal(k_ctx, (spec.n_ctx, width), jnp.float32)
  out = {"ctx": ctx}
  if spec.conditional:
    hidden = embed_dim // 16
    if hidden < 1:
      raise ValueError(f"image embedding width {embed_dim} is too small for the Meta-Net")
    out["meta_net"] = {"linear1": _torch_linear(k1, embed_dim, hidden),
                       "linear2": _torch_linear(k2, hidden, width)}
  return out


def check_prompt(prompt: Mapping[str, Any], spec: PromptSpec, *, width: int,
                 num_classes: int, source: str = "prompt") -> None:
  """A clear error when learned params do not fit the config (context length, width, CSC)."""
  spec = spec.resolved()
  ctx = np.shape(prompt["ctx"])
  want = (num_classes, spec.n_ctx, width) if spec.csc else (spec.n_ctx, width)
  if len(ctx) == 3 and not spec.csc:
    raise ValueError(f"{source}: ctx {ctx} is class-specific (CSC) but config.prompt.csc is "
                     f"False")
  if len(ctx) == 2 and spec.csc:
    raise ValueError(f"{source}: ctx {ctx} is unified but config.prompt.csc is True")
  if ctx[-2] != spec.n_ctx:
    raise ValueError(f"{source}: context length {ctx[-2]} != config.prompt.n_ctx / ctx_init "
                     f"word count {spec.n_ctx}")
  if ctx[-1] != width:
    raise ValueError(f"{source}: context width {ctx[-1]} != the CLIP text width {width}")
  if spec.csc and ctx[0] != num_classes:
    raise ValueError(f"{source}: class-specific context for {ctx[0]} classes, the class list "
                     f"has {num_classes} (CSC cannot transfer to other classes)")
  del want
  if spec.conditional != ("meta_net" in prompt):
    raise ValueError(f"{source}: {'has' if 'meta_net' in prompt else 'lacks'} a Meta-Net but "
                     f"config.prompt.conditional is {spec.conditional}")


def meta_net(p: Mapping[str, Any], x: jax.Array) -> jax.Array:
  h = jax.nn.relu(x @ p["linear1"]["kernel"] + p["linear1"]["bias"])
  return h @ p["linear2"]["kernel"] + p["linear2"]["bias"]


# ----------------------------------------------------------------------------- forward


def assemble(token_embedding: jax.Array, ctx: jax.Array, ids: jax.Array,
             order: Optional[jax.Array], n_ctx: int) -> jax.Array:
  """(C, L, D) prompt embeddings: SOT, context, name, '.', EOT, pad in the class layout.

  `ctx` is (M, D) or (C, M, D); the name/period/EOT/pad rows come from the frozen token table.
  """
  emb = jnp.take(token_embedding, ids, axis=0).astype(ctx.dtype)
  c = ids.shape[0]
  ctx = jnp.broadcast_to(ctx, (c, n_ctx, ctx.shape[-1]))
  x = jnp.concatenate([emb[:, :1], ctx, emb[:, 1 + n_ctx:]], axis=1)
  if order is not None:
    x = jnp.take_along_axis(x, order[:, :, None], axis=1)
  return x


def _encode(clip_model, variables, emb: jax.Array, eot: jax.Array) -> jax.Array:
  return clip_model.apply(variables, emb, eot, method="encode_text_embeddings")


def text_features(clip_model, variables: Mapping[str, Any], ctx: jax.Array, cp: ClassPrompts,
                  *, chunk: int = 0, remat: bool = False) -> jax.Array:
  """(C, E) unnormalised text features of every class for one context (M, D) / (C, M, D).

  With `chunk` > 0 the classes are encoded `chunk` at a time (lax.map); with `remat` each
  chunk's text pass is recomputed in the backward pass instead of being stored.
  """
  tok = variables["params"]["txt"]["token_embedding"]
  c, m = cp.num_classes, cp.n_ctx
  ids, eot = jnp.asarray(cp.ids), jnp.asarray(cp.eot)
  order = None if cp.order is None else jnp.asarray(cp.order)
  csc = ctx.ndim == 3

  def encode(ids_k, eot_k, order_k, ctx_k):
    return _encode(clip_model, variables, assemble(tok, ctx_k, ids_k, order_k, m), eot_k)

  if remat:
    encode = jax.checkpoint(encode)
  if not chunk or chunk >= c:
    return encode(ids, eot, order, ctx)
  n = -(-c // chunk)
  pad = n * chunk - c

  def split(x):
    if x is None:
      return None
    x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
    return x.reshape(n, chunk, *x.shape[1:])

  xs = (split(ids), split(eot), split(order), split(ctx) if csc else None)

  def body(args):
    ids_k, eot_k, order_k, ctx_k = args
    return encode(ids_k, eot_k, order_k, ctx if ctx_k is None else ctx_k)

  out = jax.lax.map(body, xs)
  return out.reshape(n * chunk, -1)[:c]


def l2n(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_features(clip_model, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """CLIP's projected image embedding (eval mode: RN BatchNorm uses running statistics)."""
  return clip_model.apply(variables, images, method="encode_image")


def logits(clip_model, variables: Mapping[str, Any], images: jax.Array, cp: ClassPrompts, *,
           chunk: int = 0, remat: bool = False, image_feats: Optional[jax.Array] = None
           ) -> jax.Array:
  """(B, C) exp(logit_scale) * cos(image, class text): CoOp if `prompt` has no Meta-Net,
  CoCoOp otherwise (per-image context ctx + MetaNet(normalised image feature), vmapped)."""
  params = variables["params"]
  prompt = params["prompt"]
  f = l2n(image_features(clip_model, variables, images) if image_feats is None else image_feats)
  scale = jnp.exp(params["txt"]["logit_scale"]).astype(jnp.float32)
  ctx = prompt["ctx"]
  if "meta_net" not in prompt:
    g = l2n(text_features(clip_model, variables, ctx, cp, chunk=chunk, remat=remat))
    return scale * f @ g.T
  pi = meta_net(prompt["meta_net"], f.astype(ctx.dtype))  # (B, D)
  ctx_b = ctx[None] + pi[:, None, :]  # the same shift on every context token

  def one(ctx_i, f_i):
    g = l2n(text_features(clip_model, variables, ctx_i, cp, chunk=chunk, remat=remat))
    return scale * g @ f_i

  return jax.vmap(one)(ctx_b, f)


def cross_entropy(lg: jax.Array, labels: jax.Array) -> jax.Array:
  lp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(lp, labels[:, None].astype(jnp.int32), axis=-1))


def count(tree: Any) -> int:
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


__all__ = ["PromptSpec", "ClassPrompts", "build_class_prompts", "init_prompt", "check_prompt",
           "assemble", "text_features", "logits", "cross_entropy", "layout_order", "l2n",
           "image_features", "meta_net", "count", "POSITIONS"]
