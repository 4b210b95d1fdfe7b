"""Accelerator benchmark: images/s, step time and MFU of the two main training steps.

* CLIP-ReID stage 2, ViT-B/16 at 256x128, batch 64 (ID + triplet + i2t, Adam);
* LPT phase 2, ViT-B/16 at 224, batch 256 (+ 256 instance-balanced images, A-GCL, SGD);

each in float32 and bfloat16 compute (parameters and optimizer state float32), with
random weights of the real shapes. MFU = XLA's FLOP count of the compiled step / step
time / the chip's dense bf16 peak (H100/H200 SXM 989 TFLOP/s, H100 PCIe 756, A100 312),
chosen by `device_kind`; on other devices MFU is not printed.

  bash benchmarks/gpu.sh                 # one GPU, under 5 minutes
  python benchmarks/gpu.py --tiny        # tiny towers on any backend (the CPU test)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402,F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# Dense bf16 peaks (FLOP/s), most specific name first.
PEAKS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
         ("A100", 312e12)]


def bf16_peak(kind: str) -> float | None:
  for name, peak in PEAKS:
    if name.lower() in kind.lower():
      return peak
  return None


def build(which: str, batch: int, dtype, tiny: bool):
  from benchmarks import steps  # pylint: disable=import-outside-toplevel
  from jaxprompt.models.clip import CLIP, CLIPConfig  # pylint: disable=import-outside-toplevel
  from jaxprompt.models.vit import ViT, ViTConfig  # pylint: disable=import-outside-toplevel
  width, layers, heads = (64, 2, 1) if tiny else (768, 12, 12)
  if which == "reid":
    size = (64, 32) if tiny else (256, 128)
    cfg = CLIPConfig(embed_dim=64 if tiny else 512, vision="vit", vision_width=width,
                     vision_layers=layers, vision_heads=heads, patch_size=16, pretrained_grid=14,
                     context_length=8 if tiny else 77, vocab_size=50 if tiny else 49408,
                     text_width=64 if tiny else 512, text_heads=1 if tiny else 8,
                     text_layers=1 if tiny else 12).with_input(size, patch_stride=16)
    model = CLIP(cfg, dtype=dtype)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *size, 3)),
                                             jnp.zeros((1, cfg.context_length), jnp.int32))
                        )(jax.random.key(0))
    variables = {"params": {"img": variables["params"]["img"]}}
    j = steps.reid_jax(model, variables, batch, dtype=dtype, num_ids=16 if tiny else 751,
                       size=size, vit=True)
    return j, batch
  image = 32 if tiny else 224
  g = image // 16
  vit = ViT(ViTConfig(patch=16, width=width, depth=layers, heads=heads, mlp_dim=4 * width,
                      grid=(g, g)), ln_eps=1e-5, dtype=dtype)
  img = jax.jit(lambda r: vit.init(r, jnp.zeros((1, image, image, 3)))["params"])(
      jax.random.key(0))
  j = steps.lpt_jax(vit, img, batch, dtype=dtype, image=image,
                    num_classes=10 if tiny else steps.PLACES_CLASSES)
  return j, 2 * batch


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="tiny towers and batches (CPU test)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
  ap.add_argument("--reid-batch", type=int, default=64)
  ap.add_argument("--lpt-batch", type=int, default=256)
  ap.add_argument("--attention", default=None, choices=["xla", "cudnn"],
                  help="jax.nn.dot_product_attention implementation (default: jax's choice)")
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)
  from jaxprompt.models import layers  # pylint: disable=import-outside-toplevel
  layers.set_attention_implementation(args.attention)
  dev = jax.devices()[0]
  kind = dev.device_kind
  peak = bf16_peak(kind) if dev.platform == "gpu" else None
  print(f"device: {dev.platform} {kind} x{jax.device_count()}; bf16 peak "
        f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s", flush=True)
  steps_n = 2 if args.tiny else args.steps
  results = []
  for which, batch in (("reid", 8 if args.tiny else args.reid_batch),
                       ("lpt", 4 if args.tiny else args.lpt_batch)):
    for dname, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
      t0 = time.perf_counter()
      j, images = build(which, batch, dtype, args.tiny)
      j["run"]()  # first execution (compiled already)
      compile_s = time.perf_counter() - t0
      t = time.perf_counter()
      for _ in range(steps_n):
        j["run"]()
      step_s = (time.perf_counter() - t) / steps_n
      r = {"step": "stage2 ViT-B/16 256x128" if which == "reid" else "LPT phase2 ViT-B/16 224",
           "batch": batch, "images": images, "precision": dname, "step_s": step_s,
           "img_s": images / step_s, "tflop_per_step": j["flops"] / 1e12,
           "achieved_tflop_s": j["flops"] / step_s / 1e12,
           "mfu_vs_bf16_peak": (j["flops"] / step_s / peak) if peak else None,
           "setup_s": compile_s, "loss": j["loss"](), "device": kind}
      mfu = f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if peak else "n/a"
      print(f"{r['step']:<26} batch {batch:>4} {dname:<8}  {r['step_s'] * 1e3:9.1f} ms/step  "
            f"{r['img_s']:9.1f} img/s  {r['achieved_tflop_s']:8.2f} TFLOP/s  MFU {mfu}  "
            f"(setup+compile {compile_s:.0f} s, loss {r['loss']:.3f})", flush=True)
      results.append(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
