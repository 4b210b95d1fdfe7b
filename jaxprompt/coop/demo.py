"""A small text-prompt demonstration that runs on a CPU in about a minute.

1. A tiny CLIP is trained contrastively on generated image-caption pairs (coloured shapes on
   noise, captions such as "a drawing of a red circle." in six styles), so that its zero-shot
   accuracy is well above chance. A share of the pairs are photographed under warm light
   (every pixel times CAST: white turns yellowish, purple reddish, blue dark) and captioned
   "a warm photo of a {}.".
2. A held-out classification set of fresh warm-lit images (one folder per class) is split into
   base and new classes; zero-shot CLIP, CoOp and CoCoOp (trained on 8 shots of the base
   classes, their context initialised from "a photo of a") are scored on both halves through
   the CoOp pipeline, giving table rows (base, new, H). The hand-written "a photo of a {}."
   does not say how the images were taken, so it scores the warm colours as the plain ones
   they resemble; the learned context finds what the prompt leaves out, as CoOp's context
   does on EuroSAT's satellite photos (where "a centered satellite photo of a {}." is the
   hand-tuned fix).

    python -m jaxprompt.coop.demo [--workdir DIR] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from jaxprompt import metrics as metrics_lib
from jaxprompt.coop import config as config_lib
from jaxprompt.coop import train
from jaxprompt import tokenizer
from jaxprompt.models.clip import CLIP, CLIPConfig

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
          "yellow": (230, 220, 40), "purple": (150, 50, 200), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "cross")
CLASSES = [f"{c} {s}" for s in SHAPES for c in COLORS]
SIZE = 32
# Caption styles of the pretraining pairs, one drawn per pair. None is the zero-shot template
# "a photo of a {}.": as with real CLIP, the hand-written prompt is a guess at how captions
# read, which is what CoOp's learned context improves on.
CAPTIONS = ("{}.", "a {}.", "an image of a {}.", "a drawing of a {}.", "a picture with a {}.",
            "this is a {}.")
# The warm-light domain: its share of the pretraining pairs, its caption, its colour factors.
WARM_SHARE, WARM_CAPTION, CAST = 0.3, "a warm photo of a {}.", (1.0, 0.85, 0.45)
DATA_VERSION = 3  # bumped when the generated images change: older files are not reused


def tiny_config() -> CLIPConfig:
  return CLIPConfig(embed_dim=64, vision="vit", vision_width=64, vision_layers=2, vision_heads=2,
                    patch_size=8, pretrained_grid=SIZE // 8, context_length=77, vocab_size=49408,
                    text_width=64, text_heads=2, text_layers=2)


def _masks(yy: jax.Array, xx: jax.Array, cy, cx, r) -> jax.Array:
  """(len(SHAPES), SIZE, SIZE) masks of every shape centred at (cy, cx) with radius r."""
  dy, dx = yy - cy, xx - cx
  ady, adx = jnp.abs(dy), jnp.abs(dx)
  return jnp.stack([
      dy ** 2 + dx ** 2 <= r ** 2,                                          # circle
      (ady <= 0.8 * r) & (adx <= 0.8 * r),                                  # square
      (dy <= 0.8 * r) & (dy >= -r) & (adx <= (dy + r) * 0.55),              # triangle
      ((ady <= 0.3 * r) | (adx <= 0.3 * r)) & (ady <= r) & (adx <= r),      # cross
  ])


# The shapes sit at the centre (1 px jitter) so that a briefly trained tower tells them apart
# (with 3 px it tells about half the shapes, and the image tower, not the text, limits the
# accuracy of every prompt).
RADIUS, JITTER, NOISE = (7.0, 11.0), 1.0, 90.0


@jax.jit
def draw_batch(key: jax.Array, labels: jax.Array, warm: jax.Array) -> jax.Array:
  """(B, SIZE, SIZE, 3) float images in [0, 255] (whole levels) of classes `labels` (indices
  into CLASSES): one shape of random radius, position and brightness on uniform noise, the
  whole image times CAST where `warm` (B,) is set. Drawn on the device, so pretraining needs
  no host-side images."""
  b = labels.shape[0]
  k_r, k_c, k_bg, k_col = jax.random.split(key, 4)
  r = jax.random.uniform(k_r, (b,), minval=RADIUS[0], maxval=RADIUS[1])
  cy, cx = (SIZE / 2 + jax.random.uniform(k_c, (b, 2), minval=-JITTER, maxval=JITTER)).T
  yy, xx = jnp.mgrid[:SIZE, :SIZE].astype(jnp.float32)
  masks = jax.vmap(lambda y, x, rr: _masks(yy, xx, y, x, rr))(cy, cx, r)
  mask = jnp.take_along_axis(masks, (labels // len(COLORS))[:, None, None, None], axis=1)[:, 0]
  rgb = jnp.asarray(list(COLORS.values()), jnp.float32)[labels % len(COLORS)]
  col = jnp.clip(rgb * jax.random.uniform(k_col, (b, 1), minval=0.8, maxval=1.1), 0, 255)
  bg = jax.random.uniform(k_bg, (b, SIZE, SIZE, 3), maxval=NOISE)
  img = jnp.where(mask[..., None], col[:, None, None, :], bg)
  img = jnp.where(warm[:, None, None, None], img * jnp.asarray(CAST, jnp.float32), img)
  return jnp.floor(img)


def write_folder(root: str, per_class: int, seed: int, classes: Sequence[str] = CLASSES,
                 warm: bool = True) -> str:
  """`root/<class name>/<i>.png` (the folder-per-class layout of `jaxprompt.coop.data`)."""
  labels = np.repeat([CLASSES.index(c) for c in classes], per_class)
  images = draw_batch(jax.random.key(seed), jnp.asarray(labels), jnp.full(len(labels), warm))
  images = np.asarray(images).astype(np.uint8)
  for i, (label, img) in enumerate(zip(labels, images)):
    d = os.path.join(root, CLASSES[label].replace(" ", "_"))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(img).save(os.path.join(d, f"{i % per_class}.png"))
  return root


def pretrain(steps: int = 300, batch: int = 64, seed: int = 0, lr: float = 2e-3,
             progress: bool = False):
  """Contrastive (InfoNCE, both directions) training of the tiny CLIP on generated pairs.

  Each batch draws distinct classes, so no two captions in it are the same; a WARM_SHARE of
  the pairs are warm-lit and captioned WARM_CAPTION. Images are drawn inside the jitted step.
  """
  from jaxprompt.coop.data import CLIP_MEAN, CLIP_STD  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  model = CLIP(cfg)
  styles = CAPTIONS + (WARM_CAPTION,)  # the warm caption is the last style
  captions = tokenizer.tokenize([t.format(c) for c in CLASSES for t in styles])
  length = int(captions.argmax(-1).max()) + 1
  captions = jnp.asarray(captions[:, :length]).reshape(len(CLASSES), len(styles), length)
  mean = 255.0 * jnp.asarray(CLIP_MEAN, jnp.float32)
  std = 255.0 * jnp.asarray(CLIP_STD, jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)),
                                  captions[:1, 0])
  params = variables["params"]
  tx = optax.adamw(lr, weight_decay=0.01)
  opt = tx.init(params)
  n = min(batch, len(CLASSES))

  def loss_fn(p, x, ids):
    v = {"params": p}
    f = model.apply(v, x, method="encode_image")
    g = model.apply(v, ids, method="encode_text")
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    g = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
    lg = jnp.exp(p["txt"]["logit_scale"]) * f @ g.T
    labels = jnp.arange(lg.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(lg.T, labels).mean())

  @jax.jit
  def step(p, o, key):
    k_cls, k_img, k_style, k_warm = jax.random.split(key, 4)
    cls = jax.random.permutation(k_cls, len(CLASSES))[:n]
    warm = jax.random.uniform(k_warm, (n,)) < WARM_SHARE
    x = (draw_batch(k_img, cls, warm) - mean) / std
    style = jnp.where(warm, len(CAPTIONS), jax.random.randint(k_style, (n,), 0, len(CAPTIONS)))
    loss, g = jax.value_and_grad(loss_fn)(p, x, captions[cls, style])
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  key = jax.random.key(seed + 1)
  losses = []
  for i in metrics_lib.progress(range(steps), desc="coop: pretrain CLIP", unit="step",
                                enabled=progress and jax.process_index() == 0):
    params, opt, loss = step(params, opt, jax.random.fold_in(key, i))
    losses.append(loss)
  # The mean of the last steps' losses (one batch's is noisy). CLIP's pretrained scale is
  # exp(4.6052) = 100; the learned one is kept (frozen afterwards).
  loss = float(np.mean(jax.device_get(losses[-20:]))) if losses else float("nan")
  return model, {"params": params}, loss


def demo_config(root: str, method: str, protocol: str = "base2new"):
  c = config_lib.base_config()
  c.method, c.protocol = method, protocol
  c.model.image_size = SIZE
  c.data.name, c.data.root = "folder", root
  c.data.shots, c.data.workers = 8, 0
  c.eval.batch_size = 96
  c.data.crop_scale = (1.0, 1.0)  # whole 32-px images (flip only): crops cut the shapes away
  c.seeds = (1,)
  c.prompt.ctx_init, c.prompt.n_ctx = "a photo of a", 4
  # 20 epochs of 6 batches. The tiny text tower is steep in its context (CoOp's first gradient
  # is ~30x the context's norm), so CoOp takes a small lr. CoCoOp's Meta-Net starts with
  # torch's Linear init, whose output (norm ~2) swamps the 4 context tokens (norm ~0.2) and
  # shrinks their gradient ~30x: it takes a large one.
  c.train.total_epochs = 20
  c.train.optimizer.lr = 0.003 if method == "coop" else 0.1
  c.data.batch_size = 16
  c.train.ckpt_every_steps = 0
  c.train.progress = False
  c.train.async_checkpoints = False
  return c


def _load_or_pretrain(path: str, steps: int, seed: int, progress: bool = False):
  """The pretrained tiny CLIP, kept in `path` so that a rerun (or a resumed job) scores its
  checkpointed prompts against the same towers instead of pretraining again."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  meta = {"steps": int(steps), "seed": int(seed), "data": DATA_VERSION}
  if os.path.isfile(path):
    with np.load(path) as z:
      if json.loads(str(z["__meta__"])) == meta:
        flat = {tuple(k.split("/")): jnp.asarray(z[k]) for k in z.files
                if not k.startswith("__")}  # the params only, not the metadata entries
        return (CLIP(tiny_config()), {"params": traverse_util.unflatten_dict(flat)},
                float(z["__loss__"]) if "__loss__" in z.files else float("nan"))
  model, variables, loss = pretrain(steps=steps, seed=seed, progress=progress)
  flat = traverse_util.flatten_dict(jax.device_get(variables["params"]))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, __meta__=json.dumps(meta), __loss__=np.float64(loss),
           **{"/".join(k): np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)  # atomic: a killed run never leaves a half-written file
  return model, variables, loss


def run(workdir: str, *, pretrain_steps: int = 250, per_class_test: int = 12,
        seed: int = 1, pretrain_seed: int = 0, quiet: bool = True) -> dict:
  """Returns {'rows': {method: {'base', 'new', 'H'}}, 'pretrain_loss', 'seconds', 'chance'}.

  Resumable: the pretrained CLIP is kept in `workdir/clip.npz`, the generated images are
  reused, and each method's pipeline resumes from its checkpoints and eval files. `quiet`
  (the default job): a progress bar over pretraining, and the pipelines' own tables go to
  the log only; the caller reports the rows.
  """
  t0 = time.time()
  clip_model, clip_vars, loss = _load_or_pretrain(os.path.join(workdir, "clip.npz"),
                                                  pretrain_steps, pretrain_seed, progress=quiet)
  root = os.path.join(workdir, f"shapes_v{DATA_VERSION}_{per_class_test}")
  if not os.path.isfile(os.path.join(root, "done")):
    write_folder(os.path.join(root, "train"), 8, seed=123)
    write_folder(os.path.join(root, "test"), per_class_test, seed=456)
    open(os.path.join(root, "done"), "w").close()
  rows = {}
  for method in ("zeroshot", "coop", "cocoop"):
    c = demo_config(root, method)
    c.seeds = (int(seed),)
    res = train.run(c, os.path.join(workdir, method), clip=(clip_model, clip_vars), quiet=quiet)
    rows[method] = {k: v["mean"] for k, v in res["summary"].items()}
  return dict(rows=rows, pretrain_loss=loss, seconds=time.time() - t0,
              chance=100.0 / (len(CLASSES) // 2))


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="workdir/coop_demo")
  p.add_argument("--seed", type=int, default=1, help="few-shot sampling and prompt-init seed")
  args = p.parse_args(argv)
  out = run(args.workdir, seed=args.seed, quiet=False)
  print(f"{'method':10s}{'base':>8s}{'new':>8s}{'H':>8s}   (chance {out['chance']:.1f}%)")
  for m, r in out["rows"].items():
    print(f"{m:10s}{r['base']:8.2f}{r['new']:8.2f}{r['H']:8.2f}")
  print(f"{out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
