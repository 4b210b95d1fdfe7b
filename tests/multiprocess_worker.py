"""One process of a (simulated) multi-host run: a few FSDP+data-parallel toy steps.

Run by tests/test_sharding.py: either one process with 4 devices, or two processes
with 2 devices each talking over gloo. Each process feeds only its own slice of
every batch. Process 0 writes the final trainable params to --out.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

  from jaxprompt import optim, sharding as shd, trainer
  from jaxprompt.convert.io import flatten
  from tests import toy_pipeline as toy

  assert jax.device_count() == 4, jax.devices()
  config = toy.get_config()
  mesh = shd.make_mesh(shd.mesh_axes(fsdp=2))  # data 2 x fsdp 2
  params, model_state = toy.init_params(config, jax.random.key(0))
  trainable, frozen = optim.split(params, toy.STAGE2_RULES)
  tx = optim.make_optimizer(trainable, toy.STAGE2_RULES, name="adam", learning_rate=1e-2)
  state_sh, frozen_sh = trainer.make_shardings(trainable, frozen, model_state, tx, mesh,
                                               [(".*", "fsdp")])
  state = trainer.init_state(trainable, model_state, tx, state_sh)
  frozen = shd.put(frozen, frozen_sh)
  step = trainer.jit_train_step(toy.make_loss_fn(config), tx, state_sh, frozen_sh, mesh)
  rng = shd.put(jax.random.key(1), shd.replicated(mesh))
  loader = toy.make_loader(config, 0)  # takes this process's slice of each batch
  assert loader.local_batch_size == config.data.batch_size // args.num_processes
  for i, local in enumerate(loader.iterate(0)):
    if i == args.steps:
      break
    state, metrics = step(state, frozen, shd.global_batch(local, mesh), rng)
  # Gather the sharded params to every process, then process 0 writes them.
  from jax.experimental import multihost_utils
  out = multihost_utils.process_allgather(state["params"], tiled=True)
  if jax.process_index() == 0:
    np.savez(args.out, **{k: np.asarray(v) for k, v in flatten(out).items()})
  print("loss", float(jax.device_get(metrics["loss"])))


if __name__ == "__main__":
  main()
