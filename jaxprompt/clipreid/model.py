"""CLIP-ReID's pieces around the CLIP towers: identity prompts, SIE, BNNeck heads.

Parameter groups (separate subtrees, so stage rules select them by name): the identity
tokens `cls_ctx` and the SIE
table live under `prompt`; the BNNecks and classifiers under `head`; the CLIP
towers stay under `img` / `txt` as `load_clip` returns them. The towers take
the prompts as inputs: the text tower reads assembled token embeddings, the
image tower reads the SIE vector for the class token.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import tokenizer
from jaxprompt.models import layers

TEMPLATES = {
    "person": "A photo of a X X X X person.",
    "vehicle": "A photo of a X X X X vehicle.",
}
VEHICLE_DATASETS = ("veri", "vehicleid")
PREFIX_LEN = 5      # SOT + "a photo of a"
NUM_ID_TOKENS = 4   # the four "X" placeholders


def template_for(dataset: str) -> str:
  """The reference picks the vehicle template for VeRi and VehicleID only.

  The VehicleID reader names its dataset `vehicleid-<test size>` (e.g. `vehicleid-800`);
  that suffix is the test list, not another dataset, so it maps to `vehicleid`.
  """
  name = re.sub(r"-\d+$", "", dataset.lower())
  return TEMPLATES["vehicle" if name in VEHICLE_DATASETS else "person"]


@dataclasses.dataclass(frozen=True)
class TextPrompt:
  """Fixed token embeddings around the learned identity tokens."""
  prefix: jax.Array   # (PREFIX_LEN, width)
  suffix: jax.Array   # (context - PREFIX_LEN - NUM_ID_TOKENS, width)
  eot_index: int


def build_text_prompt(clip_model, clip_variables, template: str) -> TextPrompt:
  """Embeds the template once; positions 5..8 are replaced by identity tokens."""
  ids = tokenizer.tokenize([template])
  if not np.all(ids[0, PREFIX_LEN:PREFIX_LEN + NUM_ID_TOKENS] == ids[0, PREFIX_LEN]):
    raise ValueError(f"template {template!r} must have its {NUM_ID_TOKENS} placeholder tokens "
                     f"at positions {PREFIX_LEN}..{PREFIX_LEN + NUM_ID_TOKENS - 1}")
  emb = clip_model.apply(clip_variables, jnp.asarray(ids), method="embed_tokens")[0]
  return TextPrompt(prefix=emb[:PREFIX_LEN], suffix=emb[PREFIX_LEN + NUM_ID_TOKENS:],
                    eot_index=int(ids[0].argmax()))


def init_identity_tokens(rng: jax.Array, num_ids: int, width: int) -> jax.Array:
  """`cls_ctx`: N(0, 0.02), not initialised from the embedding of "x"."""
  return 0.02 * jax.random.normal(rng, (num_ids, NUM_ID_TOKENS, width), jnp.float32)


def assemble_prompts(prompt: TextPrompt, id_tokens: jax.Array) -> jax.Array:
  """(B, 4, width) identity tokens -> (B, context, width) token embeddings."""
  b = id_tokens.shape[0]
  tile = lambda x: jnp.broadcast_to(x, (b, *x.shape)).astype(id_tokens.dtype)
  return jnp.concatenate([tile(prompt.prefix), id_tokens, tile(prompt.suffix)], axis=1)


def text_features(clip_model, clip_variables, prompt: TextPrompt,
                  id_tokens: jax.Array) -> jax.Array:
  """Raw (never normalised) projected text features for a batch of identity tokens."""
  emb = assemble_prompts(prompt, id_tokens)
  eot = jnp.full((emb.shape[0],), prompt.eot_index, jnp.int32)
  return clip_model.apply(clip_variables, emb, eot, method="encode_text_embeddings")


# SIE: one learned vector per (camera, view) added to the class token only.

def sie_rows(num_cams: int, num_views: int, camera: bool, view: bool) -> int:
  if camera and view:
    return num_cams * num_views
  return num_cams if camera else (num_views if view else 0)


def init_sie(rng: jax.Array, rows: int, width: int) -> jax.Array:
  """timm trunc_normal_(std=0.02): truncation at +-2 absolute is ~+-100 sigma."""
  return 0.02 * jax.random.truncated_normal(rng, -100.0, 100.0, (rows, width), jnp.float32)


def sie_index(cams: jax.Array, views: jax.Array, num_views: int, camera: bool,
              view: bool) -> jax.Array:
  if camera and view:
    return cams * num_views + views
  return cams if camera else views


class ReIDHead(nn.Module):
  """Two BNNecks (bias fixed at 0, scale trained) and two bias-free classifiers.

  `use_bias=False` is the reference's frozen zero bias. Classifier weights start
  from N(0, 0.001). The BatchNorm is torch's (unbiased running variance).
  """
  num_classes: int

  @nn.compact
  def __call__(self, feat: jax.Array, feat_proj: jax.Array, train: bool = False) -> dict[str, Any]:
    bn = lambda name: lambda x: layers.BatchNorm(use_bias=False, name=name)(x, train)
    dense = lambda name: nn.Dense(self.num_classes, use_bias=False, name=name,
                                  kernel_init=nn.initializers.normal(0.001))
    bn_feat = bn("bottleneck")(feat.astype(jnp.float32))
    bn_proj = bn("bottleneck_proj")(feat_proj.astype(jnp.float32))
    return {"logits": dense("classifier")(bn_feat),
            "logits_proj": dense("classifier_proj")(bn_proj),
            "bn_feat": bn_feat, "bn_feat_proj": bn_proj}


def test_embedding(feats: dict[str, jax.Array]) -> jax.Array:
  """NECK_FEAT 'before': concat(final, proj) pre-BN, L2-normalised as a whole."""
  x = jnp.concatenate([feats["final"], feats["proj"]], axis=-1).astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
