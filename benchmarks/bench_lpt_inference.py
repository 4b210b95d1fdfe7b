"""Benchmark: LPT inference, fused (first depth-G blocks shared) vs two passes vs plain ViT.

LPT's two-pass inference costs about 2.1x a plain ViT-B/16 forward in token terms; the
fused form runs the first depth - G blocks once for the query and the main pass and
costs about 1.6x (lpt.md 4). This runs all three on a small ViT with ViT-B/16's token
layout (224 px, patch 16: 197 tokens; 10 prompt tokens, G = 6 of 12 blocks), checks
that fused and two-pass agree, and prints the times and ratios.

  python benchmarks/bench_lpt_inference.py [--width 192 --batch 16 --repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxprompt.lpt import model as lpt_model  # noqa: E402
from jaxprompt.models.vit import ViT, ViTConfig  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--width", type=int, default=192)
  ap.add_argument("--heads", type=int, default=3)
  ap.add_argument("--depth", type=int, default=12)
  ap.add_argument("--image", type=int, default=224)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  grid = args.image // 16
  cfg = ViTConfig(patch=16, width=args.width, depth=args.depth, heads=args.heads,
                  mlp_dim=4 * args.width, grid=(grid, grid))
  vit = ViT(cfg, ln_eps=1e-5)
  spec = lpt_model.PromptSpec(method="lpt", num_classes=100, group_layers=args.depth // 2)
  key = jax.random.key(0)
  images = jax.random.normal(key, (args.batch, args.image, args.image, 3))
  img = jax.jit(vit.init)(key, images[:1])["params"]
  params = {"img": img, **lpt_model.init_trainables(key, cfg, spec)}

  fused = lpt_model.make_predict(vit, spec, fused=True)
  naive = lpt_model.make_two_pass_predict(vit, spec)
  plain = jax.jit(lambda p, x: vit.apply({"params": p["img"]}, x))

  a, b = fused(params, images), naive(params, images)
  err = float(jnp.max(jnp.abs(a["logits"] - b["logits"])))
  t_fused = timed(fused, params, images, repeats=args.repeats)
  t_naive = timed(naive, params, images, repeats=args.repeats)
  t_plain = timed(plain, params, images, repeats=args.repeats)
  n, t, g, d = cfg.grid[0] * cfg.grid[1] + 1, spec.prompt_length, spec.group_layers, cfg.depth
  tok_naive = (d * (n + t) + (d - g) * (n + t) + g * (n + 2 * t)) / (d * n)
  tok_fused = (d * (n + t) + g * (n + 2 * t)) / (d * n)
  print(f"device {jax.devices()[0].platform}, ViT width {args.width} depth {d} heads "
        f"{args.heads}, {n} tokens, batch {args.batch}; max |fused - naive| logits {err:.2e}")
  print(f"plain  {t_plain * 1e3:8.2f} ms  1.00x")
  print(f"naive  {t_naive * 1e3:8.2f} ms  {t_naive / t_plain:.2f}x  (token estimate "
        f"{tok_naive:.2f}x)")
  print(f"fused  {t_fused * 1e3:8.2f} ms  {t_fused / t_plain:.2f}x  (token estimate "
        f"{tok_fused:.2f}x)")
  print(f"fused / naive = {t_fused / t_naive:.3f}")
  flops = {k: f.lower(params, images).compile().cost_analysis()["flops"]
           for k, f in (("fused", fused), ("plain", plain))}
  print(f"XLA flop count: fused / plain = {flops['fused'] / flops['plain']:.2f}x")
  if err > 1e-4:
    raise SystemExit(f"fused and two-pass inference disagree: {err}")


if __name__ == "__main__":
  main()
