"""Benchmark: one training step, jaxprompt against PyTorch eager, same model/batch/threads.

  python benchmarks/bench_train_step.py --model vit_b16 --batch 8 [--rounds 3]
  python benchmarks/bench_train_step.py --model rn50 --batch 32
  python benchmarks/bench_train_step.py --model lpt --batch 4     # 4 CB + 4 IB images
  python benchmarks/bench_train_step.py --model coop --batch 32    # RN50, 10 classes
  python benchmarks/bench_train_step.py --model cocoop --batch 1   # ViT-B/16, 10 classes
  python benchmarks/bench_train_step.py --quick                    # tiny towers, seconds
  python benchmarks/bench_train_step.py --quick --model vit_b16,rn50 --batch 8   # several

Prints the step times (median of interleaved rounds), the speed-up (torch time / our
time, with the min..max of the per-round ratios), XLA's FLOP count for the step, and
the achieved FLOP/s of each side as a fraction of the same process's large-matmul rate
(XLA's for jaxprompt, torch's for torch). See benchmarks/steps.py for the steps.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


MODELS = ("vit_b16", "rn50", "lpt", "coop", "cocoop")


def bench_one(model: str, batch: int, *, rounds: int, quick: bool, precision: str,
              threads: int, command: str, alone: bool = False) -> dict:
  """One step pair, timed in interleaved rounds (`alone`: all of one side's rounds, then all
  of the other's); the result row as a dict."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import steps  # pylint: disable=import-outside-toplevel
  dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
  if model in ("coop", "cocoop"):
    step = steps.coop_step(batch, conditional=model == "cocoop", dtype=dtype, tiny=quick)
  elif model == "lpt":
    step = steps.lpt_step(batch, dtype=dtype, tiny=quick, image=32 if quick else 224)
  else:
    step = steps.reid_step(model, batch, dtype=dtype, tiny=quick,
                           size=(64, 32) if quick else (256, 128),
                           num_ids=16 if quick else steps.NUM_IDS)
  sides = {"jaxprompt": step.jax_step, "torch": step.torch_step}
  if alone:
    times = {k: common.interleaved({k: fn}, rounds=rounds)[k] for k, fn in sides.items()}
  else:
    times = common.interleaved(sides, rounds=rounds)
  res = common.ratio_summary(times, "jaxprompt", "torch")
  mm = steps.matmul_rates(512 if quick else 2048, rounds=2 if quick else 3)
  res.update(
      bench="train_step", model=model, batch=batch, images=step.images,
      precision=precision, threads=threads, rounds=rounds, quick=quick, alone=alone,
      gflop=step.flops / 1e9,
      jax_matmul_gflops=mm["jax"] / 1e9, torch_matmul_gflops=mm["torch"] / 1e9,
      jax_frac_of_matmul=step.flops / res["jaxprompt_s"] / mm["jax"],
      torch_frac_of_matmul=step.flops / res["torch_s"] / mm["torch"],
      jax_img_s=step.images / res["jaxprompt_s"], torch_img_s=step.images / res["torch_s"],
      loss_jax=step.jax_loss(), loss_torch=step.torch_loss(), command=command)
  print(f"{model} batch {batch} ({step.images} images), {threads} threads: "
        f"jaxprompt {res['jaxprompt_s']:.3f} s, torch {res['torch_s']:.3f} s, "
        f"speed-up {res['ratio']:.2f}x ({res['ratio_min']:.2f}..{res['ratio_max']:.2f}); "
        f"{res['gflop']:.0f} GFLOP; of the matmul rate: jax {res['jax_frac_of_matmul']:.2f}, "
        f"torch {res['torch_frac_of_matmul']:.2f}")
  return res


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="vit_b16",
                  help=f"one of {', '.join(MODELS)}, or several separated by commas (timed "
                       "one after the other in this process, one JSON line each)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--alone", action="store_true",
                  help="time each side's rounds on their own, not alternating with the other's")
  common.add_common_args(ap)
  args = ap.parse_args(argv)
  models = args.model.split(",")
  for m in models:
    if m not in MODELS:
      ap.error(f"--model: {m!r} is not one of {', '.join(MODELS)}")
  threads = common.set_threads()
  argv_s = " ".join(sys.argv[1:] if argv is None else argv)
  out = []
  for m in models:
    res = bench_one(m, args.batch, rounds=1 if args.quick else args.rounds, quick=args.quick,
                    precision=args.precision, threads=threads, alone=args.alone,
                    command=f"python benchmarks/bench_train_step.py {argv_s}".strip())
    common.emit(res, args.json)
    out.append(res)
  return out


if __name__ == "__main__":
  main()
