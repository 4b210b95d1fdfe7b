"""Step time of the sharded train step vs the same step without sharding annotations.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_sharding.py
  python benchmarks/bench_sharding.py --fsdp=4 --width=2048   # on a GPU/TPU host

Both variants run `jaxprompt.trainer.train_step` on the same MLP, batch and
optimizer in one process: "sharded" is jitted with in/out shardings over the mesh
(data parallel, or FSDP with --fsdp), "plain" is `jax.jit` with no shardings on
one device. Prints the median step times and their ratio (sharded / plain).
On fake CPU devices the ratio shows partitioning overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxprompt import optim, sharding as shd, trainer  # noqa: E402
from jaxprompt.optim import FREEZE, Rule  # noqa: E402


class Mlp(nn.Module):
  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.gelu(nn.Dense(self.width, name=f"fc{i}")(x))
    return nn.Dense(10, name="out")(x)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--fsdp", type=int, default=0)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()

  model = Mlp(args.width, args.depth)
  rng = jax.random.key(0)
  params = {"img": model.init(rng, jnp.zeros((1, args.width)))["params"]}
  rules = [("img/fc0/.*", FREEZE), (".*", Rule())]  # a frozen part, like the real stages
  # Host copies: each variant places (and donates) its own device buffers.
  trainable, frozen = jax.device_get(optim.split(params, rules))
  tx = optim.make_optimizer(trainable, rules, name="adam", learning_rate=1e-3)

  def loss_fn(p, model_state, batch, rng):
    logits = model.apply({"params": p["img"]}, batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, (model_state, {})

  batch = {"x": np.random.default_rng(0).normal(size=(args.batch, args.width)).astype(np.float32),
           "y": np.zeros((args.batch,), np.int32)}

  def timed(step, state, frozen, make_batch, rng):
    times = []
    for i in range(args.steps + 2):
      b = make_batch()
      t = time.perf_counter()
      state, m = step(state, frozen, b, rng)
      jax.block_until_ready((state, m))
      if i >= 2:  # skip compilation and warm-up
        times.append(time.perf_counter() - t)
    return statistics.median(times)

  # Sharded: the trainer's own jit with in/out shardings and donation.
  mesh = shd.make_mesh(shd.mesh_axes(args.fsdp))
  rules_sh = shd.default_rules(bool(args.fsdp))
  state_sh, frozen_sh = trainer.make_shardings(trainable, frozen, {}, tx, mesh, rules_sh)
  state = trainer.init_state(trainable, {}, tx, state_sh)
  step = trainer.jit_train_step(loss_fn, tx, state_sh, frozen_sh, mesh)
  t_sharded = timed(step, state, shd.put(frozen, frozen_sh),
                    lambda: shd.global_batch(batch, mesh), shd.put(rng, shd.replicated(mesh)))

  # Plain: the same pure step, jitted without any sharding annotation, one device.
  plain = jax.jit(lambda s, f, b, r: trainer.train_step(s, f, b, r, loss_fn=loss_fn, tx=tx),
                  donate_argnums=(0,))
  state = dict(params=jax.device_put(trainable), model_state={}, opt=tx.init(trainable),
               step=jnp.int32(0))
  t_plain = timed(plain, state, jax.device_put(frozen), lambda: jax.device_put(batch), rng)

  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, mesh {dict(mesh.shape)}, "
        f"width {args.width}, depth {args.depth}, batch {args.batch}")
  print(f"sharded step: {t_sharded * 1e3:.2f} ms")
  print(f"plain step:   {t_plain * 1e3:.2f} ms")
  print(f"ratio sharded/plain: {t_sharded / t_plain:.3f}")


if __name__ == "__main__":
  main()
