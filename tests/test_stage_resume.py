"""Later stages resume from their own checkpoints without reading the earlier stage.

CLIP-ReID stage 2 and LPT phase 2 carry the earlier stage's frozen leaves (identity
tokens and their text features; the shared prompts) in their own checkpoints: with the
earlier stage's final checkpoint corrupted, a rerun of the later stage resumes and
finishes with the parameters of an uninterrupted run. Without checkpoints of its own,
the later stage's error names the stage to rerun and the path, in one line.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

import jax
import numpy as np
import pytest

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import methods
from jaxprompt.clipreid import config as clipreid_config
from jaxprompt.lpt import config as lpt_config


def _corrupt_final(workdir: str, stage: str) -> str:
  ckdir = ckpt_lib.checkpoint_dir(workdir, stage)
  step = ckpt_lib.final_step(ckdir)
  files = glob.glob(os.path.join(ckdir, str(step), "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return f"{ckdir}/{step}"


def _drop_final(workdir: str, stage: str) -> None:
  """Delete the stage's final checkpoint, so that a rerun must resume and train again."""
  ckdir = ckpt_lib.checkpoint_dir(workdir, stage)
  ck = ckpt_lib.Checkpointer(ckdir, async_save=False)
  try:
    steps = ck.all_steps()
    assert len(steps) >= 2, steps  # an earlier periodic checkpoint to resume from
    ck.delete(steps[-1])
  finally:
    ck.close()


def _assert_same(a, b) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _check_lazy_resume(run, workdir: str, first: str, second: str, scratch=()) -> None:
  full = run(None)
  ref_state, ref_frozen = full[second].state, full[second].frozen
  where = _corrupt_final(workdir, first)
  _drop_final(workdir, second)
  for path in scratch:  # caches derived from the earlier stage: not needed to resume
    os.remove(path)
  again = run(second)[second]
  assert int(jax.device_get(again.state["step"])) == int(jax.device_get(ref_state["step"]))
  _assert_same(ref_state, again.state)
  _assert_same(ref_frozen, again.frozen)
  # The earlier stage was never read: its corrupt checkpoint is still in place.
  assert not os.path.exists(os.path.join(workdir, first, "corrupt_checkpoints"))
  # Finished: a rerun restores the final checkpoint, again without the earlier stage.
  _assert_same(ref_state, run(second)[second].state)

  # Without checkpoints of its own the later stage must read the earlier one: one line
  # naming the stage to rerun and the checkpoint's path.
  shutil.rmtree(os.path.join(workdir, second))
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as e:
    run(second)
  msg = str(e.value)
  assert "\n" not in msg
  assert re.search(rf"final checkpoint of stage '{first}' \({re.escape(where)}\)", msg), msg
  assert f"--stage={first}" in msg, msg


@pytest.fixture(scope="module")
def market(tmp_path_factory):
  from jaxprompt.demo.reid_data import write_synthetic_market
  return write_synthetic_market(str(tmp_path_factory.mktemp("market")), num_train_ids=6,
                                num_test_ids=4, cams=2, images_per_id_cam=2, cams_per_id=(2, 2),
                                num_distractors=1, num_junk=1, size=(32, 16), supersample=1)


def test_clipreid_stage2_resumes_without_stage1(market, tmp_path):
  c = clipreid_config.tiny(clipreid_config.paper_config("market1501", "vit_b16", "clipreid"),
                           market)
  c.stage2.total_steps = 4
  c.stage2.ckpt_every_steps = 2
  workdir = str(tmp_path / "run")
  module = methods.get(c.pipeline)
  _check_lazy_resume(lambda stage: module.run(c, workdir, stage=stage), workdir,
                     "stage1", "stage2",
                     scratch=[os.path.join(workdir, "stage2", "text_features.npz")])


def test_lpt_phase2_resumes_without_phase1(tmp_path):
  c = lpt_config.tiny(lpt_config.paper_config("places_lt", "lpt"))
  c.phase2.total_steps = 4
  c.phase2.ckpt_every_steps = 2
  c.eval.stages = ("phase2",)
  workdir = str(tmp_path / "run")
  module = methods.get(c.pipeline)
  _check_lazy_resume(lambda stage: module.run(c, workdir, stage=stage), workdir,
                     "phase1", "phase2")
