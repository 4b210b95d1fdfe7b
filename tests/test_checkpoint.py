"""Checkpoints: restore into target shardings, fingerprints, corrupt-step fallback."""
from __future__ import annotations

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import checkpoint as ckpt_lib, sharding as shd

import toy_pipeline as toy


def _short_config(**stage1):
  c = toy.get_config()
  c.stage1.total_epochs = 0
  c.stage1.total_steps = 6
  c.stage1.ckpt_every_steps = 2
  c.stage1.async_checkpoints = False
  c.stage1.progress = False
  for k, v in stage1.items():
    c.stage1[k] = v
  return c


def test_save_restore_into_target_shardings(tmp_path):
  mesh = shd.make_mesh(shd.mesh_axes(fsdp=4))
  tree = {"w": jnp.arange(32.0).reshape(8, 4), "n": jnp.int32(3), "k": jnp.ones((3,), jnp.bfloat16)}
  fp = ckpt_lib.fingerprint(tree)
  sh = {"w": shd.NamedSharding(mesh, shd.P("fsdp", None)), "n": shd.replicated(mesh),
        "k": shd.replicated(mesh)}
  placed = shd.put(tree, sh)
  assert ckpt_lib.fingerprint(placed) == fp  # layout-independent
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(5, placed, {"epoch": 1, "batch": 2})
  # Restore into a different layout than the one saved.
  sh2 = {"w": shd.NamedSharding(mesh, shd.P(None, "fsdp")), "n": shd.replicated(mesh),
         "k": shd.replicated(mesh)}
  state, meta = ck.restore_latest(shd.abstract(tree, sh2))
  assert meta["epoch"] == 1 and meta["batch"] == 2 and meta["step"] == 5
  assert state["w"].sharding.spec == shd.P(None, "fsdp")
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(tree["w"]))
  assert state["k"].dtype == jnp.bfloat16
  ck.close()


def test_flipped_bytes_are_detected(tmp_path, caplog):
  tree = {"w": jnp.arange(4096.0)}
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(1, tree, {})
  ck.save(2, {"w": tree["w"] + 1}, {})
  for path in glob.glob(str(tmp_path / "ck" / "2" / "state" / "**" / "d" / "*"), recursive=True):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
  with caplog.at_level(logging.ERROR):
    state, meta = ck.restore_latest(jax.eval_shape(lambda: tree))
  assert meta["step"] == 1
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(tree["w"]))
  assert "checkpoint" in caplog.text and "/2 is corrupt or unreadable" in caplog.text
  assert ck.all_steps() == [1]
  ck.close()


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  workdir = str(tmp_path)
  first = toy.run(_short_config(), workdir, stage="stage1")["stage1"]
  ckdir = ckpt_lib.checkpoint_dir(workdir, "stage1")
  assert sorted(int(s) for s in os.listdir(ckdir)) == [2, 4, 6]
  # Truncate the data files of the newest (final) step.
  files = glob.glob(os.path.join(ckdir, "6", "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.ERROR):
    again = toy.run(_short_config(), workdir, stage="stage1")["stage1"]
  assert "stage1/checkpoints/6 is corrupt or unreadable" in caplog.text
  assert "falling back to the previous checkpoint" in caplog.text
  assert os.listdir(os.path.join(workdir, "stage1", "corrupt_checkpoints"))
  # Resumed from step 4 and retrained steps 5-6: the same final parameters.
  for a, b in zip(jax.tree.leaves(first.state["params"]), jax.tree.leaves(again.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ckpt_lib.final_step(ckdir) == 6
