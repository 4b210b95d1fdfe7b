"""Brief supervised pretraining of a tiny ViT on procedural glyphs, saved as an AugReg `.npz`.

The long-tailed demo needs a frozen backbone that already knows something, as LPT's
ImageNet-21k ViT does, but whose labels have nothing to do with the evaluation task. Here the
"upstream" task is a synthetic alphabet: each class is a fixed glyph made of two to four random
strokes (line segments and arcs), and every sample redraws it with its own rotation, scale,
shear, shift, stroke width, point jitter, colours and noise. The backbone thus learns stroke and
shape features, which transfer to handwritten digits, without ever seeing a digit label.

The result is written in the classic AugReg/vit_jax layout (`Transformer/encoderblock_{i}/...`,
plus the `head/*` classifier, which loaders drop), so `jaxprompt.convert.timm_vit.load_vit` reads it,
with the number of heads recovered from the stored shapes. A `<out>.json` file next to it
records the settings, the loss curve and the held-out glyph accuracy; a second call with the
same settings returns the existing file.

Images are normalised with mean = std = 0.5 per channel (AugReg's convention), exposed as
`MEAN` / `STD`; a pipeline fine-tuning or prompting the backbone should use the same.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from typing import Any, Optional, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt import metrics as metrics_lib
from jaxprompt.convert.io import write_arrays
from jaxprompt.models.vit import ViT, ViTConfig

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
_FORMAT = 1


class PretrainData(Protocol):
  """What pretraining needs from its data: a label space and a batch sampler."""
  num_classes: int

  def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (B, H, W, 3), labels int (B,))."""

  def describe(self) -> dict:
    """JSON-able settings that identify the data (for reuse of a saved result)."""


def _arc(rng: np.random.Generator, pieces: int) -> np.ndarray:
  c = rng.uniform(-0.35, 0.35, 2)
  r = rng.uniform(0.25, 0.6)
  a0 = rng.uniform(0, 2 * np.pi)
  sweep = rng.uniform(0.6, 1.6) * np.pi
  t = a0 + sweep * np.linspace(0, 1, pieces + 1)
  pts = c + r * np.stack([np.cos(t), np.sin(t)], -1)
  return np.concatenate([pts[:-1], pts[1:]], -1)  # (pieces, 4)


class GlyphData:
  """A synthetic alphabet: `num_classes` random stroke glyphs, redrawn with jitter per sample.

  Glyphs are polylines of at most `max_segments` segments in [-1, 1]^2 coordinates; the
  alphabet is a function of `seed` only.
  """

  def __init__(self, num_classes: int = 64, image_size: int = 16, seed: int = 0,
               max_segments: int = 16):
    self.num_classes = int(num_classes)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.max_segments = int(max_segments)
    rng = np.random.default_rng([seed, 0x474C5950])
    self.segments = np.zeros((num_classes, max_segments, 4), np.float32)
    self.valid = np.zeros((num_classes, max_segments), bool)
    for k in range(num_classes):
      segs = []
      for _ in range(int(rng.integers(2, 5))):
        if rng.random() < 0.45:
          segs.append(_arc(rng, 4))
        else:
          p = rng.uniform(-0.7, 0.7, 2)
          d = rng.uniform(0.5, 1.2) * np.array([np.cos(a := rng.uniform(0, np.pi)), np.sin(a)])
          segs.append(np.concatenate([p - d / 2, p + d / 2])[None])
      segs = np.concatenate(segs)[:max_segments]
      self.segments[k, :len(segs)] = segs
      self.valid[k, :len(segs)] = True
    s = self.image_size
    g = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
    yy, xx = np.meshgrid(g, g, indexing="ij")
    self._pix = np.stack([xx.reshape(-1), yy.reshape(-1)], -1)  # (P, 2)

  def describe(self) -> dict:
    return {"kind": "glyphs", "num_classes": self.num_classes, "image_size": self.image_size,
            "seed": self.seed, "max_segments": self.max_segments}

  def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(self.num_classes, size=batch)
    seg = self.segments[labels].reshape(batch, -1, 2, 2)  # (B, K, 2 ends, xy)
    valid = self.valid[labels]
    # Random affine per sample: rotation, anisotropic scale, shear, shift; then point jitter.
    ang = rng.uniform(-0.35, 0.35, batch)
    sc = rng.uniform(0.7, 1.0, (batch, 2))
    shear = rng.uniform(-0.2, 0.2, batch)
    cos, sin = np.cos(ang), np.sin(ang)
    # rows of diag(sc) @ rot @ [[1, shear], [0, 1]]
    mat = np.stack([np.stack([cos, cos * shear - sin], -1),
                    np.stack([sin, sin * shear + cos], -1)], -2) * sc[:, :, None]
    shift = rng.uniform(-0.15, 0.15, (batch, 1, 1, 2))
    pts = np.einsum("bij,bkej->bkei", mat.astype(np.float32), seg) + shift.astype(np.float32)
    pts += rng.normal(0, 0.04, pts.shape).astype(np.float32)
    a, b = pts[:, :, 0], pts[:, :, 1]  # (B, K, 2)
    # Squared distance of every pixel centre to every segment, coordinates kept separate.
    px, py = self._pix[:, 0], self._pix[:, 1]  # (P,)
    ax, ay = a[..., 0:1], a[..., 1:2]  # (B, K, 1)
    abx, aby = b[..., 0:1] - ax, b[..., 1:2] - ay
    apx, apy = px - ax, py - ay  # (B, K, P)
    t = np.clip((apx * abx + apy * aby) / np.maximum(abx * abx + aby * aby, 1e-8), 0.0, 1.0)
    dx, dy = apx - t * abx, apy - t * aby
    d2 = dx * dx + dy * dy
    d2[~valid] = np.inf
    d = np.sqrt(d2.min(1))  # (B, P)
    pixel = 2.0 / self.image_size
    width = rng.uniform(0.07, 0.16, (batch, 1))
    # Anti-aliased stroke: coverage ramps over one pixel around the stroke's edge.
    ink = np.clip((width - d) / pixel + 0.5, 0.0, 1.0)[..., None].astype(np.float32)
    # Ink and paper differ in brightness; either may be the lighter one.
    light = 0.5 + 0.5 * rng.uniform(0.0, 1.0, (batch, 1, 3))
    dark = 0.4 * rng.uniform(0.0, 1.0, (batch, 1, 3))
    light_ink = rng.random((batch, 1, 1)) < 0.5
    fg, bg = np.where(light_ink, light, dark), np.where(light_ink, dark, light)
    img = bg * (1 - ink) + fg * ink
    img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
    img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return img.reshape(batch, self.image_size, self.image_size, 3), labels.astype(np.int32)


class Classifier(nn.Module):
  """The tower (`img`, exactly `models.vit.ViT`) plus a linear `head` on its class token."""
  config: ViTConfig
  num_classes: int
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    feat = ViT(self.config, ln_eps=self.ln_eps, name="img")(images)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(feat)


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 with `MEAN` / `STD`."""
  x = np.asarray(images, np.float32) / 255.0
  return (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def to_augreg(img: dict, config: ViTConfig, head: Optional[dict] = None) -> dict[str, np.ndarray]:
  """The tower's params (`{'patch_embed', 'blocks_0', ...}`) -> flat AugReg/vit_jax arrays."""
  f = lambda x: np.asarray(x, np.float32)  # noqa: E731
  d, h = config.width, config.heads
  hd = d // h
  out = {"cls": f(img["cls_token"]), "embedding/kernel": f(img["patch_embed"]["kernel"]),
         "embedding/bias": f(img["patch_embed"]["bias"]),
         "Transformer/posembed_input/pos_embedding": f(img["pos_embed"]),
         "Transformer/encoder_norm/scale": f(img["norm"]["scale"]),
         "Transformer/encoder_norm/bias": f(img["norm"]["bias"])}
  for i in range(config.depth):
    blk, s = img[f"blocks_{i}"], f"Transformer/encoderblock_{i}/"
    mha = s + "MultiHeadDotProductAttention_1/"
    for src, dst in (("ln_1", "LayerNorm_0"), ("ln_2", "LayerNorm_2")):
      out[f"{s}{dst}/scale"] = f(blk[src]["scale"])
      out[f"{s}{dst}/bias"] = f(blk[src]["bias"])
    qkv_k, qkv_b = f(blk["attn"]["qkv"]["kernel"]), f(blk["attn"]["qkv"]["bias"])
    for j, name in enumerate(("query", "key", "value")):
      out[f"{mha}{name}/kernel"] = qkv_k[:, j * d:(j + 1) * d].reshape(d, h, hd)
      out[f"{mha}{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, hd)
    out[mha + "out/kernel"] = f(blk["attn"]["out"]["kernel"]).reshape(h, hd, d)
    out[mha + "out/bias"] = f(blk["attn"]["out"]["bias"])
    for j, name in ((0, "fc1"), (1, "fc2")):
      out[f"{s}MlpBlock_3/Dense_{j}/kernel"] = f(blk["mlp"][name]["kernel"])
      out[f"{s}MlpBlock_3/Dense_{j}/bias"] = f(blk["mlp"][name]["bias"])
  if head is not None:
    out["head/kernel"] = f(head["kernel"])
    out["head/bias"] = f(head["bias"])
  return out


def sidecar_path(out_path: str) -> str:
  root, _ = os.path.splitext(os.fspath(out_path))
  return root + ".json"


def pretrain_tiny_vit(out_path: str, *, data: Optional[PretrainData] = None, steps: int = 600,
                      seed: int = 0, width: int = 64, depth: int = 4, heads: int = 2,
                      mlp_ratio: int = 4, patch: int = 4, image_size: int = 16,
                      batch_size: int = 128, learning_rate: float = 3e-3,
                      weight_decay: float = 0.05, warmup_steps: int = 50,
                      ln_eps: float = 1e-6, log_every: int = 50, overwrite: bool = False) -> str:
  """Pretrains the tiny ViT and writes it to `out_path` (AugReg `.npz`); returns the path.

  Args:
    out_path: the `.npz` to write; `<out>.json` gets settings, losses and accuracy.
    data: the upstream task (default: a 64-class `GlyphData` at `image_size`).
    steps, batch_size, learning_rate, weight_decay, warmup_steps: AdamW with linear warmup
      and cosine decay to zero, gradient norm clipped at 1.
    seed: model initialisation and sample order (the glyph alphabet uses it too by default).
    width, depth, heads, mlp_ratio, patch, image_size: the architecture; the position
      embedding is an (image_size / patch)^2 grid.
    ln_eps: LayerNorm epsilon used while pretraining (timm's 1e-6).
    overwrite: retrain even when `<out>.json` shows a finished run with these settings.
  """
  result = pretrain_params(
      data=data, steps=steps, seed=seed, width=width, depth=depth, heads=heads,
      mlp_ratio=mlp_ratio, patch=patch, image_size=image_size, batch_size=batch_size,
      learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps,
      ln_eps=ln_eps, log_every=log_every, reuse_from=None if overwrite else out_path)
  if result is None:  # an identical finished run is on disk
    return os.fspath(out_path)
  write_arrays(out_path, to_augreg(result["params"]["img"], result["config"],
                                   result["params"]["head"]))
  meta = {k: v for k, v in result.items() if k not in ("params", "config")}
  metrics_lib.write_json(sidecar_path(out_path), meta, indent=1)
  return os.fspath(out_path)


def _prefetch(data: PretrainData, rng: np.random.Generator, batch: int, steps: int):
  """Yields `steps` normalised batches, drawn in order by a thread ahead of the train step."""
  q: queue.Queue = queue.Queue(maxsize=3)
  stop = threading.Event()

  def produce():
    try:
      for _ in range(steps):
        x, y = data.sample(rng, batch)
        item = (normalize(x), y)
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
    except BaseException as e:  # handed to the consumer, which re-raises it
      q.put(e)

  worker = threading.Thread(target=produce, daemon=True)
  worker.start()
  try:
    for _ in range(steps):
      item = q.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    worker.join()


def pretrain_params(*, data: Optional[PretrainData] = None, steps: int = 600, seed: int = 0,
                    width: int = 64, depth: int = 4, heads: int = 2, mlp_ratio: int = 4,
                    patch: int = 4, image_size: int = 16, batch_size: int = 128,
                    learning_rate: float = 3e-3, weight_decay: float = 0.05,
                    warmup_steps: int = 50, ln_eps: float = 1e-6, log_every: int = 50,
                    reuse_from: Optional[str] = None) -> Optional[dict[str, Any]]:
  """The training run behind `pretrain_tiny_vit`, returning params instead of writing them.

  Returns a dict: params ({'img', 'head'}), config (ViTConfig), settings, losses
  ([[step, loss], ...]), eval_accuracy (held-out samples), seconds. With `reuse_from` set
  to a path whose sidecar records the same settings, returns None without training.
  """
  if image_size % patch:
    raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
  if width % heads:
    raise ValueError(f"width {width} is not divisible by heads {heads}")
  data = GlyphData(image_size=image_size, seed=seed) if data is None else data
  settings = {"format": _FORMAT, "data": data.describe() if hasattr(data, "describe") else None,
              "steps": steps, "seed": seed, "width": width, "depth": depth, "heads": heads,
              "mlp_ratio": mlp_ratio, "patch": patch, "image_size": image_size,
              "batch_size": batch_size, "learning_rate": learning_rate,
              "weight_decay": weight_decay, "warmup_steps": warmup_steps, "ln_eps": ln_eps,
              "mean": list(MEAN), "std": list(STD)}
  if reuse_from is not None and settings["data"] is not None and os.path.isfile(reuse_from):
    try:
      with open(sidecar_path(reuse_from)) as fh:
        if json.load(fh).get("settings") == settings:
          logging.info("pretrain: reusing %s (same settings)", reuse_from)
          return None
    except (OSError, ValueError):
      pass
  start = time.perf_counter()
  g = image_size // patch
  config = ViTConfig(patch=patch, width=width, depth=depth, heads=heads,
                     mlp_dim=mlp_ratio * width, grid=(g, g))
  model = Classifier(config, data.num_classes, ln_eps=ln_eps)
  # Jitted: run eagerly, every op of the init would be compiled on its own (dozens).
  params = jax.jit(lambda r: model.init(
      r, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"])(
          jax.random.PRNGKey(seed))
  warmup = min(warmup_steps, max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, 1), 0.0)
  # No weight decay on biases, LayerNorm scales, class token and position embedding.
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and path[-1].key not in ("cls_token", "pos_embed"), params)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
  opt_state = jax.jit(tx.init)(params)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()

  @jax.jit
  def step(p, s, x, y):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, acc

  @jax.jit
  def accuracy(p, x, y):
    return loss_fn(p, x, y)[1]

  losses, window = [], []
  batches = _prefetch(data, np.random.default_rng([seed, 0x50524554]), batch_size, steps)
  for i, (x, y) in enumerate(metrics_lib.progress(batches, total=steps, desc="pretraining the ViT",
                                                   unit="step")):
    params, opt_state, loss, _ = step(params, opt_state, x, y)
    window.append(loss)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      mean = float(np.mean(jax.device_get(window)))
      if not math.isfinite(mean):
        raise FloatingPointError(f"pretraining loss is {mean} at step {i + 1}")
      losses.append([i + 1, mean])
      logging.info("pretrain step %d/%d loss %.4f", i + 1, steps, mean)
      window = []
  eval_rng = np.random.default_rng([seed, 0x4556414C])
  accs = []
  for _ in range(4):
    x, y = data.sample(eval_rng, 256)
    accs.append(float(accuracy(params, normalize(x), y)))
  params = jax.device_get(params)
  return {"params": params, "config": config, "settings": settings, "losses": losses,
          "eval_accuracy": float(np.mean(accs)), "chance": 1.0 / data.num_classes,
          "seconds": time.perf_counter() - start}
