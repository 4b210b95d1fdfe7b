"""timm/AugReg-compatible ViT image tower that takes prompt tokens as inputs.

The tower is the plain ViT of timm's `VisionTransformer` (class token with its
own position embedding, pre-LN blocks, final LayerNorm, class-token feature)
and of Google's AugReg checkpoints; `load_vit` reads either layout.

Prompts are inputs, never parameters of the tower (so stage rules and checkpoints see
them as their own subtree):

* **deep prompts** (VPT-deep, LPT): `prompts` has shape `(layers, tokens,
  width)` (shared by the batch) or `(batch, layers, tokens, width)` (per
  sample). Row `j` belongs to block `prompt_start + j`: its tokens are appended
  after the sequence, the block runs, and their outputs are dropped. Blocks
  outside `[prompt_start, prompt_start + layers)` run without prompts.
  Several prompt sets may be given as a tuple, with a tuple of starts; at a
  block covered by more than one set their tokens are appended in tuple order.
  LPT phase 2 is `prompts=(shared, group), prompt_start=(0, -6)`: the
  `(12, T, D)` shared prompt in every block and the `(B, 6, T, D)` per-sample
  group prompt beside it in the last 6 blocks. A negative start counts from the
  end (`-6` is `depth - 6`).
* **shallow prompts** (VPT-shallow): `shallow_prompts` of shape `(tokens,
  width)` or `(batch, tokens, width)` is inserted once, right after the class
  token, before the first block, and travels through every block like an
  ordinary token. It can be combined with deep prompts.

Appending deep prompts at the end rather than after the class token (VPT's
placement) gives the same result: after the position embedding is added,
attention has no notion of order.

The forward is also available in pieces, for LPT's fast inference (the first k
blocks of the query pass and the main pass see identical inputs):

    x = model.apply(v, images, method='embed')
    h = model.apply(v, x, shared, start=0, stop=6, method='run_blocks')
    query = model.apply(v, model.apply(v, h, shared, start=6, method='run_blocks'),
                        method='head_feature')
    feat = model.apply(v, model.apply(v, h, (shared, group), prompt_start=(0, 6),
                                      start=6, method='run_blocks'),
                       method='head_feature')
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt.models import layers
from jaxprompt.models.layers import resize_grid_embedding

Dtype = Any
PromptArg = Union[None, jax.Array, Sequence[jax.Array]]
StartArg = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT tower, as read off a checkpoint's shapes."""
  patch: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  grid: tuple[int, int]  # position-embedding grid (rows, cols) of patches
  in_chans: int = 3

  @property
  def image_size(self) -> tuple[int, int]:
    return (self.grid[0] * self.patch, self.grid[1] * self.patch)


def _prompt_sets(prompts: PromptArg, prompt_start: StartArg, depth: int, width: int,
                 batch: int) -> list[tuple[jax.Array, int]]:
  """Normalises the deep-prompt arguments to a list of (array, first block)."""
  if prompts is None:
    return []
  if isinstance(prompts, (list, tuple)):
    arrays = list(prompts)
    starts = list(prompt_start) if isinstance(prompt_start, (list, tuple)) else None
    if starts is None:
      if prompt_start != 0:
        raise ValueError("several prompt sets need a tuple of prompt_start values, one per set")
      starts = [0] * len(arrays)
    if len(starts) != len(arrays):
      raise ValueError(f"{len(arrays)} prompt sets but {len(starts)} prompt_start values")
  else:
    if isinstance(prompt_start, (list, tuple)):
      raise ValueError("one prompt array takes one integer prompt_start")
    arrays, starts = [prompts], [prompt_start]
  out = []
  for p, s in zip(arrays, starts):
    if p is None:
      continue
    if p.ndim not in (3, 4):
      raise ValueError(f"deep prompts must be (layers, tokens, width) or (batch, layers, tokens, "
                       f"width); got shape {tuple(p.shape)}")
    if p.shape[-1] != width:
      raise ValueError(f"prompt width {p.shape[-1]} != tower width {width}")
    if p.ndim == 4 and p.shape[0] != batch:
      raise ValueError(f"per-sample prompts have batch {p.shape[0]}, images have {batch}")
    layers = p.shape[-3]
    s = int(s)
    first = s + depth if s < 0 else s
    if first < 0 or first + layers > depth:
      raise ValueError(f"prompts for {layers} layers starting at block {s} do not fit a "
                       f"{depth}-block tower")
    out.append((p, first))
  return out


class ViT(nn.Module):
  """The tower. Params: patch_embed, cls_token, pos_embed, blocks_{i}, norm.

  Images are NHWC, already normalised. `__call__` returns the class token after
  the final LayerNorm (timm `forward_head(forward_features(x), pre_logits=True)`
  with token pooling), in float32.
  """
  config: ViTConfig
  ln_eps: float = 1e-6
  exact_gelu: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block in the backward pass (layers.RematBlock)

  def setup(self):
    c = self.config
    self.patch_embed = nn.Conv(c.width, (c.patch, c.patch), strides=(c.patch, c.patch),
                               padding="VALID", dtype=self.dtype, name="patch_embed")
    self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, c.width))
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (1, 1 + c.grid[0] * c.grid[1], c.width))
    act = "gelu" if self.exact_gelu else "gelu_tanh"
    block = layers.block_class(self.remat)
    self.blocks = [block(c.heads, c.mlp_dim, act=act, ln_eps=self.ln_eps, dtype=self.dtype,
                         name=f"blocks_{i}") for i in range(c.depth)]
    self.norm = nn.LayerNorm(epsilon=self.ln_eps, dtype=jnp.float32, name="norm")

  def embed(self, images: jax.Array, shallow_prompts: Optional[jax.Array] = None) -> jax.Array:
    """Patch embedding, class token and position embedding: (B, 1 [+ S] + N, D).

    `shallow_prompts` (S, D) or (B, S, D), if given, sit right after the class
    token and get no position embedding.
    """
    c = self.config
    x = self.patch_embed(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    if (gh, gw) != tuple(c.grid):
      raise ValueError(
          f"images of {images.shape[1]}x{images.shape[2]} give a {gh}x{gw} patch grid, but the "
          f"position embedding is {c.grid[0]}x{c.grid[1]} ({c.image_size[0]}x{c.image_size[1]} "
          f"images); load the weights with image_size=({images.shape[1]}, {images.shape[2]})")
    cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x.reshape(b, gh * gw, d)], axis=1)
    x = x + self.pos_embed.astype(self.dtype)
    if shallow_prompts is not None:
      s = shallow_prompts
      if s.ndim == 2:
        s = jnp.broadcast_to(s[None], (b, *s.shape))
      if s.ndim != 3 or s.shape[0] != b or s.shape[-1] != d:
        raise ValueError(f"shallow prompts must be (tokens, {d}) or ({b}, tokens, {d}); got "
                         f"{tuple(shallow_prompts.shape)}")
      x = jnp.concatenate([x[:, :1], s.astype(self.dtype), x[:, 1:]], axis=1)
    return x

  def run_blocks(self, x: jax.Array, prompts: PromptArg = None, prompt_start: StartArg = 0,
                 start: int = 0, stop: Optional[int] = None) -> jax.Array:
    """Runs blocks `start .. stop-1` on token sequence `x` (B, L, D).

    `prompts`/`prompt_start` index blocks absolutely (block i uses row
    `i - prompt_start`), so the same prompt arrays serve every sub-range.
    """
    depth = self.config.depth
    stop = depth if stop is None else stop
    if not 0 <= start <= stop <= depth:
      raise ValueError(f"block range [{start}, {stop}) is outside a {depth}-block tower")
    b = x.shape[0]
    sets = _prompt_sets(prompts, prompt_start, depth, self.config.width, b)
    for i in range(start, stop):
      extra = []
      for p, first in sets:
        j = i - first
        if 0 <= j < p.shape[-3]:
          t = p[j] if p.ndim == 3 else p[:, j]
          extra.append(jnp.broadcast_to(t, (b, *t.shape[-2:])).astype(x.dtype))
      if extra:
        n = x.shape[1]
        # Prompt outputs are discarded: each block gets fresh prompt tokens.
        x = self.blocks[i](jnp.concatenate([x, *extra], axis=1))[:, :n]
      else:
        x = self.blocks[i](x)
    return x

  def head_feature(self, x: jax.Array) -> jax.Array:
    """Final LayerNorm of the class token: (B, D) float32."""
    return self.norm(x[:, 0])

  def __call__(self, images: jax.Array, prompts: PromptArg = None, prompt_start: StartArg = 0,
               shallow_prompts: Optional[jax.Array] = None) -> jax.Array:
    x = self.embed(images, shallow_prompts)
    x = self.run_blocks(x, prompts, prompt_start)
    return self.head_feature(x)


class ViTModel(nn.Module):
  """A `ViT` whose params sit under the top-level key `img` (what `load_vit` returns).

  Same methods and arguments as `ViT`: `__call__`, `embed`, `run_blocks`,
  `head_feature`. Models that add prompts and heads should instead hold a
  `ViT(..., name='img')` submodule of their own.
  """
  img: ViT

  def embed(self, images: jax.Array, shallow_prompts: Optional[jax.Array] = None) -> jax.Array:
    return self.img.embed(images, shallow_prompts)

  def run_blocks(self, x: jax.Array, prompts: PromptArg = None, prompt_start: StartArg = 0,
                 start: int = 0, stop: Optional[int] = None) -> jax.Array:
    return self.img.run_blocks(x, prompts, prompt_start, start, stop)

  def head_feature(self, x: jax.Array) -> jax.Array:
    return self.img.head_feature(x)

  def __call__(self, images: jax.Array, prompts: PromptArg = None, prompt_start: StartArg = 0,
               shallow_prompts: Optional[jax.Array] = None) -> jax.Array:
    return self.img(images, prompts, prompt_start, shallow_prompts)


def resize_pos_embed(img_params: Mapping, config: ViTConfig,
                     image_size: Union[int, Sequence[int]]) -> tuple[dict, ViTConfig]:
  """Resamples the tower's position embedding for `image_size` (H, W).

  The class row is kept; the grid is resized bilinearly without antialiasing
  (timm's resample_abs_pos_embed with bilinear / antialias=False).
  """
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  h, w = (int(s) for s in image_size)
  if h % config.patch or w % config.patch:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {config.patch}")
  grid = (h // config.patch, w // config.patch)
  params = dict(img_params)
  pe = jnp.asarray(params["pos_embed"])[0]
  params["pos_embed"] = resize_grid_embedding(pe, config.grid, grid, num_prefix=1)[None]
  return params, dataclasses.replace(config, grid=grid)


