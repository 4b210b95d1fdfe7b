"""Sharded steps equal the single-device step; two processes equal one (gloo on CPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxprompt import optim, sharding as shd, trainer

import launcher
import toy_pipeline as toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shapes_and_fsdp_specs():
  assert dict(shd.make_mesh().shape) == {"data": jax.device_count()}
  assert dict(shd.make_mesh(shd.mesh_axes(fsdp=4)).shape) == {"data": 2, "fsdp": 4}
  assert dict(shd.make_mesh(shd.mesh_axes(fsdp=-1)).shape) == {"data": 1, "fsdp": 8}
  with pytest.raises(ValueError, match="needs"):
    shd.make_mesh([("data", 3)])
  mesh = shd.make_mesh(shd.mesh_axes(fsdp=4))
  assert shd.fsdp_spec((192, 16), mesh) == P("fsdp", None)   # largest divisible dim
  assert shd.fsdp_spec((6, 16), mesh) == P(None, "fsdp")
  assert shd.fsdp_spec((3, 5), mesh) == P()                    # nothing divides: replicate
  assert shd.fsdp_spec((192, 16), mesh, min_size=10 ** 6) == P()
  specs = shd.param_specs({"a": np.zeros((8, 4)), "b": np.zeros(4)}, mesh,
                          [("a", "fsdp"), ("b", ("fsdp",))])
  assert specs == {"a": P("fsdp", None), "b": P("fsdp")}
  with pytest.raises(ValueError, match="no sharding rule covers"):
    shd.param_specs({"a": np.zeros(2)}, mesh, [("b", "replicate")])


def _run_steps(mesh, rules, n_steps=2):
  """Two steps of the toy stage-2 step on `mesh`; returns the new trainable params."""
  config = toy.get_config()
  params, model_state = toy.init_params(config, jax.random.key(0))
  trainable, frozen = optim.split(params, toy.STAGE2_RULES)
  tx = optim.make_optimizer(trainable, toy.STAGE2_RULES, name="adam", learning_rate=1e-2)
  state_sh, frozen_sh = trainer.make_shardings(trainable, frozen, model_state, tx, mesh, rules)
  state = trainer.init_state(trainable, model_state, tx, state_sh)
  frozen = shd.put(frozen, frozen_sh)
  step = trainer.jit_train_step(toy.make_loss_fn(config), tx, state_sh, frozen_sh, mesh)
  rng = shd.put(jax.random.key(1), shd.replicated(mesh))
  loader = toy.make_loader(config, 0)
  for local in list(loader.iterate(0))[:n_steps]:
    state, _ = step(state, frozen, shd.global_batch(local, mesh), rng)
  return state


def test_sharded_step_matches_single_device():
  single = _run_steps(shd.make_mesh([("data", 1)], devices=jax.devices()[:1]),
                      [(".*", "replicate")])
  dp = _run_steps(shd.make_mesh(), [(".*", "replicate")])
  fsdp_mesh = shd.make_mesh(shd.mesh_axes(fsdp=4))
  fsdp = _run_steps(fsdp_mesh, [(".*", "fsdp")])
  # FSDP really splits the big kernel and its Adam moments.
  kernel = fsdp["params"]["img"]["dense"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (48, 16)
  mu = [x for x in jax.tree.leaves(fsdp["opt"]) if np.shape(x) == (192, 16)]
  assert mu and all(x.sharding.spec == P("fsdp", None) for x in mu)
  for other in (dp, fsdp):
    for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(other["params"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single["model_state"]),
                    jax.tree.leaves(other["model_state"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker(args, devices, extra_env=None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                                  f"{launcher.XLA_OPT}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra_env or {})
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"),
                           *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  procs = [_worker([f"--process_id={i}", "--num_processes=2", f"--port={port}",
                    f"--out={tmp_path}/two.npz"], devices=2) for i in range(2)]
  one = _worker(["--num_processes=1", f"--out={tmp_path}/one.npz"], devices=4)
  for p in procs + [one]:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-3000:]
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(a.files) == sorted(b.files) and a.files
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=1e-6, err_msg=k)
