"""CLIP image towers (ViT, ModifiedResNet) and text tower, numerically matching OpenAI CLIP.

`load_clip(path_or_state_dict)` builds the model from an OpenAI/open_clip checkpoint
(architecture inferred from the tensor shapes) and returns `(model, variables)`:

    variables = {'params': {'img': ..., 'txt': ...},   # logit_scale at params/txt/logit_scale
                 'batch_stats': {'img': ...}}          # ModifiedResNet only

Methods (`model.apply(variables, x, method=...)`):
  encode_image(images)                    OpenAI `encode_image` (eval mode)
  encode_text(token_ids)                  OpenAI `encode_text` (EOT = argmax of the ids)
  embed_tokens(token_ids)                 token embeddings (B, ctx, width)
  encode_text_embeddings(emb, eot_index)  text tower from token embeddings (learned prompts)
  image_features(images, cv_embed, train) dict with CLIP-ReID's 'last', 'final', 'proj'

Images are NHWC float32, already normalised. The towers can run at another input
size than the checkpoint's (non-square, overlapping ViT patches, RN50 last stride
1); `load_clip` resizes the position embeddings to fit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprompt.models import layers
from jaxprompt.models.layers import Block, causal_mask

Dtype = Any
Features = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Configuration


def _rn_feature_size(n: int, last_stride: int) -> int:
  """Side of the ModifiedResNet layer4 map for an input side `n` (torch floor arithmetic)."""
  n = (n - 1) // 2 + 1  # stem conv 3x3, stride 2, padding 1
  n = n // 2 // 2 // 2  # stem avgpool, layer2, layer3
  return n // last_stride


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of a CLIP model, as OpenAI's `build_model` infers it from a state dict.

  `pretrained_grid` is the side of the checkpoint's square position-embedding grid
  (ViT tokens, or the RN attention pool). `image_size`, `patch_stride` and
  `last_stride` describe the input the model is built for; None means the
  checkpoint's own (native size, stride = patch size, RN layer4 stride 2).
  """
  embed_dim: int
  vision: str  # 'vit' or 'resnet'
  vision_width: int
  vision_layers: Union[int, tuple[int, ...]]  # int for ViT, 4 block counts for RN
  vision_heads: int
  patch_size: int  # ViT patch; 32 (total downsampling) for RN
  pretrained_grid: int
  context_length: int
  vocab_size: int
  text_width: int
  text_heads: int
  text_layers: int
  image_size: Optional[tuple[int, int]] = None
  patch_stride: Optional[int] = None
  last_stride: Optional[int] = None

  @property
  def native_image_size(self) -> tuple[int, int]:
    side = self.patch_size * self.pretrained_grid
    return (side, side)

  @property
  def input_size(self) -> tuple[int, int]:
    return tuple(self.image_size) if self.image_size is not None else self.native_image_size

  @property
  def stride(self) -> int:
    """ViT patch-embedding stride."""
    return self.patch_stride or self.patch_size

  @property
  def grid(self) -> tuple[int, int]:
    """(h, w) of the position-embedding grid at `input_size`."""
    h, w = self.input_size
    if self.vision == "vit":
      return ((h - self.patch_size) // self.stride + 1, (w - self.patch_size) // self.stride + 1)
    ls = self.last_stride or 2
    return (_rn_feature_size(h, ls), _rn_feature_size(w, ls))

  def native(self) -> "CLIPConfig":
    """The config at the checkpoint's own input size (the shapes stored in the file)."""
    return dataclasses.replace(self, image_size=None, patch_stride=None, last_stride=None)

  def with_input(self, image_size: Optional[Sequence[int]] = None,
                 patch_stride: Optional[int] = None,
                 last_stride: Optional[int] = None) -> "CLIPConfig":
    """A copy built for another input size / ViT patch stride / RN last stride (validated)."""
    if image_size is not None:
      image_size = tuple(int(s) for s in image_size)
      if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {image_size}")
    if self.vision == "vit":
      if last_stride is not None:
        raise ValueError("last_stride applies to ModifiedResNet towers only, not ViT")
      if patch_stride is not None and not 0 < patch_stride <= self.patch_size:
        raise ValueError(f"patch_stride must be in 1..{self.patch_size}, got {patch_stride}")
    else:
      if patch_stride is not None:
        raise ValueError("patch_stride applies to ViT towers only; a ModifiedResNet has no "
                         "patch embedding (use last_stride)")
      if last_stride not in (None, 1, 2):
        raise ValueError(f"last_stride must be None, 1 or 2, got {last_stride}")
    cfg = dataclasses.replace(self, image_size=image_size, patch_stride=patch_stride,
                              last_stride=last_stride)
    if min(cfg.grid) < 1:
      raise ValueError(f"image size {cfg.input_size} is too small for this {self.vision} tower")
    return cfg


# ----------------------------------------------------------------------------------------------
# Towers


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


def _layer_norm(name: str) -> nn.LayerNorm:
  # float32 statistics even under bf16 compute, eps = torch's default.
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)


class VisionTransformer(nn.Module):
  """OpenAI's ViT image tower. Params: conv1, class_embedding, positional_embedding,
  ln_pre, blocks_{i}, ln_post, proj."""
  width: int
  layers: int
  heads: int
  patch_size: int
  stride: int
  grid: tuple[int, int]
  output_dim: int
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block in the backward pass (layers.RematBlock)

  @nn.compact
  def __call__(self, images: jax.Array, cv_embed: Optional[jax.Array] = None,
               train: bool = False) -> Features:
    del train  # no dropout, no BatchNorm
    w, p, s = self.width, self.patch_size, self.stride
    x = nn.Conv(w, (p, p), strides=(s, s), padding="VALID", use_bias=False, dtype=self.dtype,
                name="conv1")(images.astype(self.dtype))
    b, gh, gw, _ = x.shape
    if (gh, gw) != tuple(self.grid):
      raise ValueError(f"images {images.shape[1:3]} give a {gh}x{gw} token grid, but the "
                       f"position embedding is for {tuple(self.grid)}; build the model for "
                       f"this image size (load_clip(..., image_size=...))")
    x = x.reshape(b, gh * gw, w)
    cls = self.param("class_embedding", _normal(w ** -0.5), (w,))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, w))
    if cv_embed is not None:
      # CLIP-ReID's SIE: added to the class token only, before the position embedding.
      cls = cls + cv_embed.astype(self.dtype)[:, None, :]
    pos = self.param("positional_embedding", _normal(w ** -0.5), (1 + gh * gw, w))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
    x = _layer_norm("ln_pre")(x).astype(self.dtype)

    last = x
    for i in range(self.layers):
      x = layers.block_class(self.remat)(self.heads, 4 * w, act="quick_gelu", ln_eps=1e-5,
                                         dtype=self.dtype, name=f"blocks_{i}")(x)
      if i == self.layers - 2:
        last = x  # CLIP-ReID's x11: output of the second-to-last block, no ln_post
    final = _layer_norm("ln_post")(x)
    proj = self.param("proj", _normal(w ** -0.5), (w, self.output_dim)).astype(self.dtype)
    final_tokens = final.astype(self.dtype)
    return {
        "last": last[:, 0].astype(jnp.float32),
        "final": final[:, 0].astype(jnp.float32),
        "proj": (final_tokens[:, 0] @ proj).astype(jnp.float32),
        # Full token tensors; under jit they cost nothing unless used.
        "last_tokens": last,
        "final_tokens": final,
        "proj_tokens": final_tokens @ proj,
    }


class Bottleneck(nn.Module):
  """ModifiedResNet block: 1x1, 3x3, avgpool(stride), 1x1 (x4); avgpool-then-1x1 shortcut."""
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def conv(features, k, name):
      return nn.Conv(features, (k, k), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                     dtype=self.dtype, name=name)

    def bn(name, y):
      return layers.BatchNorm(dtype=self.dtype, name=name)(y, train)

    s = self.stride
    out = nn.relu(bn("bn1", conv(self.planes, 1, "conv1")(x)))
    out = nn.relu(bn("bn2", conv(self.planes, 3, "conv2")(out)))
    if s > 1:
      out = nn.avg_pool(out, (s, s), strides=(s, s))
    out = bn("bn3", conv(4 * self.planes, 1, "conv3")(out))
    identity = x
    if s > 1 or x.shape[-1] != 4 * self.planes:
      if s > 1:
        identity = nn.avg_pool(identity, (s, s), strides=(s, s))
      identity = bn("downsample_bn", conv(4 * self.planes, 1, "downsample_conv")(identity))
    return nn.relu(out + identity)


class AttentionPool(nn.Module):
  """Attention pooling over [spatial mean, spatial tokens] + position embedding.

  Only the mean token's output is computed: keys and values cover all tokens, so
  it equals token 0 of the full pooling (what CLIP and CLIP-ReID use).
  """
  heads: int
  output_dim: int
  grid: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if (h, w) != tuple(self.grid):
      raise ValueError(f"layer4 map is {h}x{w}, but the attention pool position embedding is "
                       f"for {tuple(self.grid)}; build the model for this image size")
    x = x.reshape(b, h * w, c)
    mean = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(x.dtype)
    pos = self.param("positional_embedding", _normal(c ** -0.5), (1 + h * w, c))
    x = jnp.concatenate([mean, x], axis=1) + pos.astype(self.dtype)
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name)
    hd = c // self.heads
    q = dense(c, "q_proj")(x[:, :1]).reshape(b, 1, self.heads, hd)
    k = dense(c, "k_proj")(x).reshape(b, h * w + 1, self.heads, hd)
    v = dense(c, "v_proj")(x).reshape(b, h * w + 1, self.heads, hd)
    out = layers.attention(q, k, v).reshape(b, c)
    return dense(self.output_dim, "c_proj")(out)


class ModifiedResNet(nn.Module):
  """OpenAI's ResNet image tower (3-conv stem, anti-aliased strides, attention pool).

  Params: conv1-3/bn1-3 (stem), layer{l}_{j} (Bottleneck), attnpool. `last_stride`
  1 keeps layer4 at the layer3 resolution (the usual ReID change).
  """
  width: int
  layers: tuple[int, ...]
  heads: int
  output_dim: int
  grid: tuple[int, int]
  last_stride: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, cv_embed: Optional[jax.Array] = None,
               train: bool = False) -> Features:
    if cv_embed is not None:
      raise ValueError("cv_embed (SIE) is only defined for ViT image towers")
    x = images.astype(self.dtype)
    stem = [(self.width // 2, 2), (self.width // 2, 1), (self.width, 1)]
    for i, (features, stride) in enumerate(stem, start=1):
      x = nn.Conv(features, (3, 3), strides=(stride, stride), padding=[(1, 1), (1, 1)],
                  use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
      x = layers.BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train)
      x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))

    strides = (1, 2, 2, self.last_stride)
    x3 = x
    for li, (blocks, stride) in enumerate(zip(self.layers, strides)):
      for j in range(blocks):
        x = Bottleneck(self.width * 2 ** li, stride if j == 0 else 1, dtype=self.dtype,
                       name=f"layer{li + 1}_{j}")(x, train)
      if li == 2:
        x3 = x
    proj = AttentionPool(self.heads, self.output_dim, self.grid, dtype=self.dtype,
                         name="attnpool")(x)
    gap = lambda t: jnp.mean(t.astype(jnp.float32), axis=(1, 2))
    return {
        "last": gap(x3),  # layer3, global average pool
        "final": gap(x),  # layer4, global average pool
        "proj": proj.astype(jnp.float32),  # attention pool, mean token
        "last_map": x3,
        "final_map": x,
    }


class TextTransformer(nn.Module):
  """OpenAI's text tower: token + position embedding, causal pre-LN blocks, ln_final,
  EOT token @ text_projection. Also holds CLIP's `logit_scale`."""
  context_length: int
  vocab_size: int
  width: int
  heads: int
  layers: int
  output_dim: int
  dtype: Dtype = jnp.float32

  def setup(self):
    w = self.width
    self.token_embedding = self.param("token_embedding", _normal(0.02), (self.vocab_size, w))
    self.positional_embedding = self.param("positional_embedding", _normal(0.01),
                                           (self.context_length, w))
    self.blocks = [Block(self.heads, 4 * w, act="quick_gelu", ln_eps=1e-5, dtype=self.dtype,
                         name=f"blocks_{i}") for i in range(self.layers)]
    self.ln_final = _layer_norm("ln_final")
    self.text_projection = self.param("text_projection", _normal(w ** -0.5),
                                      (w, self.output_dim))
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)),
                                  ())

  def embed(self, token_ids: jax.Array) -> jax.Array:
    """(B, n) int ids -> (B, n, width) token embeddings."""
    return jnp.take(self.token_embedding, token_ids, axis=0)

  def encode(self, embeddings: jax.Array, eot_index: jax.Array) -> jax.Array:
    """(B, n, width) token embeddings, (B,) EOT positions -> (B, output_dim)."""
    b, n, _ = embeddings.shape
    if n > self.context_length:
      raise ValueError(f"sequence of {n} tokens exceeds the context length {self.context_length}")
    x = embeddings.astype(self.dtype) + self.positional_embedding[:n].astype(self.dtype)
    mask = causal_mask(n)
    for block in self.blocks:
      x = block(x, mask)
    x = self.ln_final(x)
    x = x[jnp.arange(b), jnp.asarray(eot_index)]
    return (x.astype(self.dtype) @ self.text_projection.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, token_ids: jax.Array) -> jax.Array:
    # The EOT token has the largest id in CLIP's vocabulary.
    return self.encode(self.embed(token_ids), jnp.argmax(token_ids, axis=-1))


class CLIP(nn.Module):
  """CLIP with submodules `img` (ViT or ModifiedResNet) and `txt` (text tower)."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  remat: bool = False  # ViT image tower only: rematerialise its blocks in the backward pass

  def setup(self):
    c = self.config
    if c.vision == "vit":
      self.img = VisionTransformer(c.vision_width, c.vision_layers, c.vision_heads,
                                   c.patch_size, c.stride, c.grid, c.embed_dim, dtype=self.dtype,
                                   remat=self.remat)
    elif c.vision == "resnet":
      self.img = ModifiedResNet(c.vision_width, tuple(c.vision_layers), c.vision_heads,
                                c.embed_dim, c.grid, last_stride=c.last_stride or 2,
                                dtype=self.dtype)
    else:
      raise ValueError(f"unknown vision tower {c.vision!r}")
    self.txt = TextTransformer(c.context_length, c.vocab_size, c.text_width, c.text_heads,
                               c.text_layers, c.embed_dim, dtype=self.dtype)

  def __call__(self, images: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(image embeddings, text embeddings), unnormalised; touches every parameter."""
    return self.encode_image(images), self.encode_text(token_ids)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """OpenAI `encode_image` in eval mode: (B, H, W, 3) -> (B, embed_dim)."""
    return self.img(images)["proj"]

  def image_features(self, images: jax.Array, cv_embed: Optional[jax.Array] = None,
                     train: bool = False) -> Features:
    """CLIP-ReID features 'last', 'final', 'proj' (float32), plus token tensors / maps.

    `train=True` makes RN BatchNorms use batch statistics; apply with
    `mutable=['batch_stats']`.
    """
    return self.img(images, cv_embed, train)

  def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
    return self.txt.embed(token_ids)

  def encode_text_embeddings(self, embeddings: jax.Array, eot_index: jax.Array) -> jax.Array:
    return self.txt.encode(embeddings, eot_index)

  def encode_text(self, token_ids: jax.Array) -> jax.Array:
    """OpenAI `encode_text`: (B, ctx) int ids -> (B, embed_dim)."""
    return self.txt(token_ids)


# ----------------------------------------------------------------------------------------------
# Loading


def init_shapes(config: CLIPConfig) -> dict:
  """The variables tree of `CLIP(config)` as ShapeDtypeStructs (no allocation)."""
  model = CLIP(config)
  h, w = config.input_size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids)


__all__ = ["CLIP", "CLIPConfig", "VisionTransformer", "ModifiedResNet", "TextTransformer",
           "init_shapes"]
