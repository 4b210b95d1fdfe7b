"""Transformer pieces shared by the CLIP towers and the timm/AugReg ViT.

Parameter names are generic (`ln_1`, `attn/qkv`, `attn/out`, `ln_2`, `mlp/fc1`,
`mlp/fc2`); the weight loaders map each reference layout onto them. q, k and v
are one fused Dense, as in both torch references (`in_proj_weight`, `qkv`), so a
checkpoint maps with a single transpose.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU()
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


_DEFAULT_IMPLEMENTATION: list[Optional[str]] = [None]


def set_attention_implementation(name: Optional[str]) -> None:
  """Process-wide default for `attention` (None: jax chooses, 'xla', or 'cudnn' for
  cuDNN's fused kernel on NVIDIA GPUs with bf16/fp16 inputs). Set before tracing."""
  if name not in (None, "xla", "cudnn"):
    raise ValueError(f"attention implementation must be None, 'xla' or 'cudnn', got {name!r}")
  _DEFAULT_IMPLEMENTATION[0] = name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array] = None,
              implementation: Optional[str] = None) -> jax.Array:
  """softmax(q k^T / sqrt(d) + bias) v over (batch, tokens, heads, head_dim) arrays.

  Goes through `jax.nn.dot_product_attention`, so a GPU can use cuDNN's fused
  kernel (`implementation='cudnn'`) and everything else XLA's. The XLA path
  accumulates the logits in float32 and takes the softmax in float32 even for
  bf16 inputs (where precision is lost), as the einsum version did.
  `bias` is additive and broadcastable to (batch, heads, q, k).
  """
  implementation = implementation or _DEFAULT_IMPLEMENTATION[0]
  if bias is not None:
    bias = jnp.asarray(bias)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (torch layout order q, k, v)."""
  heads: int
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None  # jax.nn.dot_product_attention's

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    b, n, width = x.shape
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by heads {self.heads}")
    hd = width // self.heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, name="qkv")(x).reshape(b, n, 3, self.heads, hd)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, self.implementation)
    return nn.Dense(width, dtype=self.dtype, name="out")(out.reshape(b, n, width))


class Mlp(nn.Module):
  hidden: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    x = activation(self.act)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
  """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""
  heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    # LayerNorm statistics in float32 (OpenAI's LayerNorm subclass does the same).
    ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=jnp.float32, name=name)
    x = x + SelfAttention(self.heads, dtype=self.dtype, name="attn")(
        ln("ln_1")(x).astype(self.dtype), mask)
    x = x + Mlp(self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(
        ln("ln_2")(x).astype(self.dtype))
    return x


# The block under `jax.checkpoint`: the backward pass recomputes each block's
# activations from its input instead of keeping them (for large batches on an
# accelerator). Parameter names and values are unchanged; outputs and gradients
# are the same computation.
RematBlock = nn.remat(Block)


def block_class(remat: bool) -> type:
  """`Block`, or `RematBlock` when `remat` is set."""
  return RematBlock if remat else Block


def causal_mask(n: int) -> jax.Array:
  """Additive causal mask (0 on and below the diagonal, -inf above), as CLIP's text tower."""
  return jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf)


def resize_grid_embedding(pe: jax.Array, old_grid: tuple[int, int],
                          new_grid: tuple[int, int], num_prefix: int = 1) -> jax.Array:
  """Resize a (prefix + h*w, C) position embedding to a new (h', w') grid.

  The prefix rows (class token, or the RN50 attention pool's mean token) are kept
  as they are. The grid is resized bilinearly with half-pixel centres and **no
  antialiasing**, which is torch's `F.interpolate(mode='bilinear',
  align_corners=False)` (CLIP-ReID's `resize_pos_embed`, timm's
  `resample_abs_pos_embed`). `jax.image.resize` antialiases by default when
  downsampling, which would not match.
  """
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if old_grid == new_grid:
    return pe
  prefix, grid = pe[:num_prefix], pe[num_prefix:]
  if grid.shape[0] != old_grid[0] * old_grid[1]:
    raise ValueError(f"position embedding has {grid.shape[0]} grid rows, "
                     f"expected {old_grid[0]}x{old_grid[1]}")
  c = grid.shape[-1]
  grid = grid.reshape(*old_grid, c).astype(jnp.float32)
  grid = jax.image.resize(grid, (*new_grid, c), method="bilinear", antialias=False)
  return jnp.concatenate([prefix, grid.reshape(-1, c).astype(pe.dtype)], axis=0)


class BatchNorm(nn.Module):
  """BatchNorm with torch's semantics, including its running-variance update.

  Flax's `nn.BatchNorm` feeds the *biased* batch variance into the running
  average; torch feeds the unbiased one (n / (n - 1)), which matters for the
  1-D BNNecks where n is only the batch size. `momentum` is torch's (weight of
  the new batch, 0.1), not Flax's decay. Parameter and statistic names
  (`scale`, `bias`, `mean`, `var`) are Flax's, so loaders and tests see the
  usual tree. Under jit with a data-sharded batch the reductions are global,
  i.e. single-device statistics.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      n = xf.size // c
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(self.dtype)
