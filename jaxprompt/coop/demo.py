"""A small text-prompt demonstration that runs on a CPU in about a minute.

1. A tiny CLIP is trained contrastively on generated image-caption pairs ("a photo of a red
   circle.": coloured shapes on noise), so that its zero-shot accuracy is well above chance.
2. A held-out classification set of fresh images (one folder per class) is split into base and
   new classes; zero-shot CLIP, CoOp and CoCoOp (trained on 16 shots of the base classes) are
   scored on both halves through the CoOp pipeline, giving table rows (base, new, H).

    python -m jaxprompt.coop.demo [--workdir DIR]
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

from jaxprompt.coop import config as config_lib
from jaxprompt.coop import train
from jaxprompt.coop.shared import CLIP, CLIPConfig, tokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
          "yellow": (230, 220, 40), "purple": (150, 50, 200), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "cross")
CLASSES = [f"{c} {s}" for s in SHAPES for c in COLORS]
SIZE = 32


def tiny_config() -> CLIPConfig:
  return CLIPConfig(embed_dim=64, vision="vit", vision_width=64, vision_layers=2, vision_heads=2,
                    patch_size=8, pretrained_grid=SIZE // 8, context_length=77, vocab_size=49408,
                    text_width=64, text_heads=2, text_layers=2)


def draw(name: str, rng: np.random.Generator) -> np.ndarray:
  """One 32x32 RGB image of `name` ("<colour> <shape>") on a noisy background."""
  color, shape = name.split(" ")
  img = rng.integers(0, 90, (SIZE, SIZE, 3)).astype(np.float32)
  r = rng.uniform(6, 11)
  cy, cx = rng.uniform(r, SIZE - r, 2)
  yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  if shape == "circle":
    mask = dy ** 2 + dx ** 2 <= r ** 2
  elif shape == "square":
    mask = (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
  elif shape == "triangle":
    mask = (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
  else:
    mask = ((np.abs(dy) <= 0.3 * r) | (np.abs(dx) <= 0.3 * r)) & (np.abs(dy) <= r) & \
        (np.abs(dx) <= r)
  col = np.asarray(COLORS[color], np.float32) * rng.uniform(0.8, 1.1)
  img[mask] = np.clip(col, 0, 255)
  return img.astype(np.uint8)


def write_folder(root: str, per_class: int, seed: int, classes: Sequence[str] = CLASSES) -> str:
  """`root/<class name>/<i>.png` (the folder-per-class layout of `jaxprompt.coop.data`)."""
  rng = np.random.default_rng(seed)
  for name in classes:
    d = os.path.join(root, name.replace(" ", "_"))
    os.makedirs(d, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(draw(name, rng)).save(os.path.join(d, f"{i}.png"))
  return root


def _normalize(x: np.ndarray) -> np.ndarray:
  from jaxprompt.coop.data import CLIP_MEAN, CLIP_STD  # pylint: disable=import-outside-toplevel
  return (x.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(
      CLIP_STD, np.float32)


def pretrain(steps: int = 300, batch: int = 64, seed: int = 0, lr: float = 2e-3):
  """Contrastive (InfoNCE, both directions) training of the tiny CLIP on generated pairs.

  Each batch draws distinct classes, so no two captions in it are the same.
  """
  cfg = tiny_config()
  model = CLIP(cfg)
  captions = tokenizer.tokenize([f"a photo of a {c}." for c in CLASSES])
  length = int(captions.argmax(-1).max()) + 1
  captions = jnp.asarray(captions[:, :length])
  rng = np.random.default_rng(seed)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)), captions[:1])
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
  def step(p, o, x, ids):
    loss, g = jax.value_and_grad(loss_fn)(p, x, ids)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  loss = jnp.nan
  for _ in range(steps):
    cls = rng.choice(len(CLASSES), n, replace=False)
    x = np.stack([_normalize(draw(CLASSES[c], rng)) for c in cls])
    params, opt, loss = step(params, opt, jnp.asarray(x), captions[cls])
  # CLIP's pretrained scale is exp(4.6052) = 100; keep the learned one (frozen afterwards).
  return model, {"params": params}, float(loss)


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
  c.train.total_epochs = 8 if method == "coop" else 2
  c.train.optimizer.lr = 0.01 if method == "coop" else 0.005
  c.data.batch_size = 16 if method == "coop" else 4
  c.train.ckpt_every_steps = 0
  c.train.progress = False
  c.train.async_checkpoints = False
  return c


def _load_or_pretrain(path: str, steps: int, seed: int):
  """The pretrained tiny CLIP, kept in `path` so that a rerun (or a resumed job) scores its
  checkpointed prompts against the same towers instead of pretraining again."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  meta = {"steps": int(steps), "seed": int(seed)}
  if os.path.isfile(path):
    with np.load(path) as z:
      if json.loads(str(z["__meta__"])) == meta:
        flat = {tuple(k.split("/")): jnp.asarray(z[k]) for k in z.files if k != "__meta__"}
        return (CLIP(tiny_config()), {"params": traverse_util.unflatten_dict(flat)},
                float(z["__loss__"]) if "__loss__" in z.files else float("nan"))
  model, variables, loss = pretrain(steps=steps, seed=seed)
  flat = traverse_util.flatten_dict(jax.device_get(variables["params"]))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, __meta__=json.dumps(meta), __loss__=np.float64(loss),
           **{"/".join(k): np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)  # atomic: a killed run never leaves a half-written file
  return model, variables, loss


def run(workdir: str, *, pretrain_steps: int = 250, per_class_test: int = 12,
        seed: int = 1, pretrain_seed: int = 0) -> dict:
  """Returns {'rows': {method: {'base', 'new', 'H'}}, 'pretrain_loss', 'seconds', 'chance'}.

  Resumable: the pretrained CLIP is kept in `workdir/clip.npz`, the generated images are
  reused, and each method's pipeline resumes from its checkpoints and eval files.
  """
  t0 = time.time()
  clip_model, clip_vars, loss = _load_or_pretrain(os.path.join(workdir, "clip.npz"),
                                                  pretrain_steps, pretrain_seed)
  root = os.path.join(workdir, f"shapes_{per_class_test}")
  if not os.path.isfile(os.path.join(root, "done")):
    write_folder(os.path.join(root, "train"), 8, seed=123)
    write_folder(os.path.join(root, "test"), per_class_test, seed=456)
    open(os.path.join(root, "done"), "w").close()
  rows = {}
  for method in ("zeroshot", "coop", "cocoop"):
    c = demo_config(root, method)
    c.seeds = (int(seed),)
    res = train.run(c, os.path.join(workdir, method), clip=(clip_model, clip_vars))
    rows[method] = {k: v["mean"] for k, v in res["summary"].items()}
  return dict(rows=rows, pretrain_loss=loss, seconds=time.time() - t0,
              chance=100.0 / (len(CLASSES) // 2))


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="workdir/coop_demo")
  p.add_argument("--seed", type=int, default=1, help="few-shot sampling and prompt-init seed")
  args = p.parse_args(argv)
  out = run(args.workdir, seed=args.seed)
  print(f"{'method':10s}{'base':>8s}{'new':>8s}{'H':>8s}   (chance {out['chance']:.1f}%)")
  for m, r in out["rows"].items():
    print(f"{m:10s}{r['base']:8.2f}{r['new']:8.2f}{r['H']:8.2f}")
  print(f"{out['seconds']:.0f} s")


if __name__ == "__main__":
  main()
