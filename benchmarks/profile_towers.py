"""Where the stage-2 step loses to torch on CPU: the image tower's forward against its backward
(RN50 or ViT-B/16, XLA against torch), and for RN50 single convolutions / average pools of its
shapes (XLA against torch's oneDNN).

  python benchmarks/profile_towers.py [--model rn50|vit_b16] [--batch 8] [--calls 3]

Not part of `make bench` (the notes in BENCHMARKS.md quote its runs). The towers are
open_clip's `RN50-quickgelu` (last stride 1) and `ViT-B-16-quickgelu` at 256x128, as CLIP-ReID
uses them; both sides hold the same random weights. Times are medians of `--calls` calls
after one warm-up call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def _median(fn: Callable[[], Any], calls: int) -> float:
  fn()
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def tower(name: str, batch: int, calls: int) -> None:
  """Forward and forward+backward of the whole image tower (RN50: BatchNorm in eval and train
  mode)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import open_clip  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from jaxprompt.convert.openai_clip import load_clip  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  vit = name == "vit_b16"
  clip_t = open_clip.create_model("ViT-B-16-quickgelu" if vit else "RN50-quickgelu")
  sd = {k: v.detach().numpy() for k, v in clip_t.state_dict().items()}
  model, variables = load_clip(sd, image_size=(256, 128),
                               **(dict(patch_stride=16) if vit else dict(last_stride=1)))
  visual = clip_t.visual
  img = variables["params"]["img"]
  if vit:  # the position embedding resized for 256x128, as in steps.reid_step
    visual.positional_embedding = torch.nn.Parameter(
        torch.from_numpy(np.asarray(img["positional_embedding"])))
  else:  # last stride 1, as in steps.reid_step
    blk = visual.layer4[0]
    blk.avgpool = torch.nn.Identity()
    blk.downsample[0] = torch.nn.Identity()
    visual.attnpool.positional_embedding = torch.nn.Parameter(torch.from_numpy(
        np.asarray(img["attnpool"]["positional_embedding"])))
  x = np.random.RandomState(0).randn(batch, 256, 128, 3).astype(np.float32)
  xj, xt = jnp.asarray(x), torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  for train in ((False,) if vit else (False, True)):
    visual.train(train)

    def proj(p, images, train=train):
      if train:
        out, _ = model.apply({"params": p, **rest}, images, None, True,
                             method="image_features", mutable=["batch_stats"])
      else:
        out = model.apply({"params": p, **rest}, images, method="image_features")
      return out["proj"]

    fwd = jax.jit(proj)
    grad = jax.jit(jax.grad(lambda p, images: (proj(p, images) ** 2).sum()))
    j_f = _median(lambda: jax.block_until_ready(fwd(params, xj)), calls)
    j_b = _median(lambda: jax.block_until_ready(grad(params, xj)), calls)
    with torch.no_grad():
      t_f = _median(lambda: visual(xt), calls)

    def torch_grad():
      visual.zero_grad(set_to_none=True)
      (visual(xt) ** 2).sum().backward()

    t_b = _median(torch_grad, calls)
    mode = "" if vit else f", BatchNorm {'train' if train else 'eval'}"
    print(f"{name} tower, batch {batch}{mode}: "
          f"forward xla {j_f:.2f} s, torch {t_f:.2f} s | backward (fwd+bwd - fwd) "
          f"xla {j_b - j_f:.2f} s, torch {t_b - t_f:.2f} s", flush=True)


def layers(batch: int, calls: int) -> None:
  """Single convolutions and 2x2 average pools of RN50's shapes (XLA time / torch time)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  F = torch.nn.functional
  rs = np.random.RandomState(0)
  # (height, width, in, out, kernel): layer1..layer4 shapes at 256x128 input
  for h, w, ci, co, k in ((64, 32, 64, 64, 3), (32, 16, 128, 128, 3), (16, 8, 256, 256, 3),
                          (16, 8, 256, 1024, 1), (16, 8, 512, 2048, 1)):
    x = rs.randn(batch, h, w, ci).astype(np.float32)
    kern = (0.01 * rs.randn(k, k, ci, co)).astype(np.float32)
    pad = [(k // 2, k // 2)] * 2

    def conv(a, b, pad=pad):
      return jax.lax.conv_general_dilated(a, b, (1, 1), pad,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(conv)
    both = jax.jit(jax.grad(lambda a, b: 0.5 * (conv(a, b) ** 2).sum(), argnums=(0, 1)))
    xj, kj = jnp.asarray(x), jnp.asarray(kern)
    j_f = _median(lambda: fwd(xj, kj).block_until_ready(), calls)
    j_b = _median(lambda: jax.block_until_ready(both(xj, kj)), calls)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    kt = torch.from_numpy(kern).permute(3, 2, 0, 1).contiguous().requires_grad_(True)

    def torch_both(xt=xt, kt=kt, k=k):
      xt.grad = kt.grad = None
      (0.5 * F.conv2d(xt, kt, padding=k // 2) ** 2).sum().backward()

    with torch.no_grad():
      t_f = _median(lambda xt=xt, kt=kt, k=k: F.conv2d(xt, kt, padding=k // 2), calls)
    t_b = _median(torch_both, calls)
    print(f"conv {ci}->{co} {k}x{k} at {h}x{w}: xla / torch time, forward {j_f / t_f:.2f}, "
          f"forward+backward {j_b / t_b:.2f}", flush=True)
  for h, w, c in ((128, 64, 64), (64, 32, 256), (32, 16, 512)):
    x = rs.randn(batch, h, w, c).astype(np.float32)
    pool = jax.jit(jax.grad(lambda a: (nn.avg_pool(a, (2, 2), (2, 2)) ** 2).sum()))
    xj = jnp.asarray(x)
    j_b = _median(lambda: pool(xj).block_until_ready(), calls)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)

    def torch_pool(xt=xt):
      xt.grad = None
      (F.avg_pool2d(xt, 2) ** 2).sum().backward()

    t_b = _median(torch_pool, calls)
    print(f"avgpool 2x2 at {h}x{w}x{c}: forward+backward xla {1e3 * j_b:.1f} ms, torch "
          f"{1e3 * t_b:.1f} ms", flush=True)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="rn50", choices=["rn50", "vit_b16"])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--calls", type=int, default=3)
  args = ap.parse_args(argv)
  print(f"{common.set_threads()} threads, {common.machine()['cpu']}")
  tower(args.model, args.batch, args.calls)
  if args.model == "rn50":
    layers(args.batch, args.calls)


if __name__ == "__main__":
  main()
