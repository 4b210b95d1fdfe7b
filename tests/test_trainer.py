"""The stage runner: NaN stop, mixed precision, stage hand-off and skip."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import checkpoint as ckpt_lib, optim, trainer

import toy_pipeline as toy


def _config(steps1=6, steps2=4):
  c = toy.get_config()
  for name, n in (("stage1", steps1), ("stage2", steps2)):
    c[name].total_epochs = 0
    c[name].total_steps = n
    c[name].ckpt_every_steps = 2
    c[name].async_checkpoints = False
    c[name].progress = False
  return c


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = _config(steps1=8)
  c.data.nan_at_batch = 4  # the 5th step of epoch 0 sees NaN inputs
  c.stage1.log_every_steps = 1
  with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 5 of stage "
                     r"'stage1'; stopping without saving it\. The last good checkpoint \(step 4\)"):
    toy.run(c, str(tmp_path), stage="stage1")
  ckdir = ckpt_lib.checkpoint_dir(str(tmp_path), "stage1")
  ck = ckpt_lib.Checkpointer(ckdir, async_save=False)
  assert ck.all_steps() == [2, 4]
  meta = ck.read_meta(4)
  assert (meta["epoch"], meta["batch"], meta["final"]) == (0, 4, False)
  ck.close()
  assert ckpt_lib.final_step(ckdir) is None


def test_stages_hand_off_and_finished_stage_is_skipped(tmp_path):
  workdir = str(tmp_path)
  res = toy.run(_config(), workdir)
  s1, s2 = res["stage1"], res["stage2"]
  trained, model_state = ckpt_lib.read_params(workdir, "stage1")
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(s1.state["params"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Stage 2 starts from stage 1's prompt (frozen there) and stage 1's head.
  np.testing.assert_array_equal(np.asarray(s2.frozen["prompt"]["ctx"]), trained["prompt"]["ctx"])
  assert int(s2.state["step"]) == 4 and s2.meta["final"]
  assert set(s2.params) == {"img", "prompt", "head"}
  # Rerunning finds both stages finished and returns the same state without training.
  again = toy.run(_config(), workdir)
  for a, b in zip(jax.tree.leaves(again["stage2"].state), jax.tree.leaves(s2.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_keeps_float32_params_and_loss():
  c = toy.get_config()
  c.precision = "bfloat16"
  params, model_state = toy.init_params(c, jax.random.key(0))
  trainable, frozen = optim.split(params, toy.STAGE2_RULES)
  tx = optim.make_optimizer(trainable, toy.STAGE2_RULES, name="adam", learning_rate=1e-3)
  state = dict(params=trainable, model_state=model_state, opt=tx.init(trainable),
               step=jnp.int32(0))
  batch = next(toy.make_loader(c, 0).iterate(0))
  new, metrics = jax.jit(lambda s, f, b, r: trainer.train_step(
      s, f, b, r, loss_fn=toy.make_loss_fn(c), tx=tx, dtype=jnp.bfloat16))(
          state, frozen, batch, jax.random.key(1))
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(metrics["loss"])
  for tree in (new["params"], new["model_state"], new["opt"]):
    for x in jax.tree.leaves(tree):
      assert x.dtype in (jnp.float32, jnp.int32), x.dtype
  assert not np.allclose(np.asarray(new["params"]["img"]["dense"]["kernel"]),
                         trainable["img"]["dense"]["kernel"])
  assert int(new["step"]) == 1


def test_durations_in_epochs_or_steps():
  loader = toy.make_loader(toy.get_config(), 0)
  assert trainer.total_steps(loader, epochs=3) == 3 * 8
  assert trainer.total_steps(loader, steps=5) == 5
  with pytest.raises(ValueError, match="total_epochs or total_steps"):
    trainer.total_steps(loader)
