"""Peak memory of CoCoOp on 1,000 ImageNet classes (ViT-B/16), from XLA's compiled memory
analysis: one training step (batch 1, as KaiyangZhou/CoOp configs/trainers/CoCoOp) and
test-time scoring of a batch of 100 images, with the text sequences at full length (77) or cut
after the last EOT, and with the class axis in one piece or chunked with rematerialisation.

Nothing is allocated: parameters are abstract (ShapeDtypeStruct), so this runs on a CPU.

    python benchmarks/bench_coop_memory.py [--classes 1000] [--chunk 100] [--only train|test]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.coop import model as M
from jaxprompt.models.clip import CLIP, CLIPConfig

VIT_B16 = CLIPConfig(embed_dim=512, vision="vit", vision_width=768, vision_layers=12,
                     vision_heads=12, patch_size=16, pretrained_grid=14, context_length=77,
                     vocab_size=49408, text_width=512, text_heads=8, text_layers=12)
WORDS = ["tench", "goldfish", "great", "white", "shark", "tiger", "hammerhead", "electric", "ray"]


def classnames(n: int) -> list[str]:
  """Names of 1-5 words (ImageNet's class names are mostly 1-4 words)."""
  rs = np.random.RandomState(0)
  return [" ".join(rs.choice(WORDS, 1 + i % 5)) for i in range(n)]


def gib(x: int) -> str:
  return f"{x / 2 ** 30:8.2f} GiB"


def analyse(fn, *args) -> dict:
  t = time.time()
  compiled = jax.jit(fn).lower(*args).compile()
  m = compiled.memory_analysis()
  return dict(temp=m.temp_size_in_bytes, args=m.argument_size_in_bytes,
              out=m.output_size_in_bytes, seconds=time.time() - t)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--chunk", type=int, default=100)
  p.add_argument("--test_batch", type=int, default=100)
  p.add_argument("--only", choices=("train", "test"), default=None)
  args = p.parse_args()

  model = CLIP(VIT_B16)
  img = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), img,
                             jax.ShapeDtypeStruct((1, 77), jnp.int32))
  spec = M.PromptSpec(ctx_init="a photo of a", conditional=True).resolved()
  n_ctx_spec = M.PromptSpec(n_ctx=4, conditional=True)  # same shapes, no token table needed
  prompt = jax.eval_shape(lambda r: M.init_prompt(r, n_ctx_spec, width=512, embed_dim=512),
                          jax.random.key(0))
  names = classnames(args.classes)
  full = M.build_class_prompts(names, spec, truncate=False)
  cut = M.build_class_prompts(names, spec)
  print(f"CoCoOp ViT-B/16, {args.classes} classes, text length full 77 / cut {cut.length}; "
        f"trainable {M.count(prompt):,}")
  print(f"{'case':52s}{'temp':>14s}{'args+out':>14s}{'compile':>9s}")

  def train_step(cp, chunk, remat):
    def step(prompt, frozen, x, y):
      def loss(pr):
        v = {"params": {**frozen["params"], "prompt": pr}}
        return M.cross_entropy(M.logits(model, v, x, cp, chunk=chunk, remat=remat), y)
      g = jax.grad(loss)(prompt)
      return jax.tree.map(lambda a, b: a - 0.002 * b, prompt, g)
    return step

  def score(cp, chunk):
    def fn(prompt, frozen, x):
      v = {"params": {**frozen["params"], "prompt": prompt}}
      return M.logits(model, v, x, cp, chunk=chunk)
    return fn

  cases = []
  if args.only in (None, "train"):
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    cases += [
        ("train step, batch 1, length 77, all classes at once", train_step(full, 0, False),
         (prompt, variables, img, y)),
        (f"train step, batch 1, length {cut.length}, all classes at once",
         train_step(cut, 0, False), (prompt, variables, img, y)),
        (f"train step, batch 1, length {cut.length}, chunks of {args.chunk} + remat",
         train_step(cut, args.chunk, True), (prompt, variables, img, y)),
    ]
  if args.only in (None, "test"):
    xt = jax.ShapeDtypeStruct((args.test_batch, 224, 224, 3), jnp.float32)
    cases += [
        (f"test scoring, batch {args.test_batch}, length {cut.length}, all classes",
         score(cut, 0), (prompt, variables, xt)),
        (f"test scoring, batch {args.test_batch}, length {cut.length}, chunks of {args.chunk}",
         score(cut, args.chunk), (prompt, variables, xt)),
    ]
  for name, fn, a in cases:
    r = analyse(fn, *a)
    print(f"{name:52s}{gib(r['temp']):>14s}{gib(r['args'] + r['out']):>14s}{r['seconds']:8.0f}s",
          flush=True)


if __name__ == "__main__":
  main()
