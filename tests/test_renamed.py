"""Old config field names on the command line are answered with the new names."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxprompt import renamed
from jaxprompt.clipreid import config as clipreid_config
from jaxprompt.coop import config as coop_config
from jaxprompt.lpt import config as lpt_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("old,new", [
    ("model.clip_weights", "model.weights"),
    ("clipreid.model.clip_weights", "clipreid.model.weights"),
    ("lpt.data.eval_batch_size", "lpt.eval.batch_size"),
    ("model.vit_weights", "model.weights"),
    ("data.dataset", "data.name"),
    ("clip.weights", "model.weights"),
    ("clip.precision", "precision"),
    ("released.path", "model.released_checkpoint"),
    ("data.test_batch_size", "eval.batch_size"),
    ("model.tiny_random.enabled", "model.tiny_random"),
    ("model.tiny_random.width", "model.tiny.width"),
])
def test_new_name(old, new):
  assert renamed.new_name(old) == new


def test_current_names_are_not_renamed():
  for f in ("model.weights", "data.name", "eval.batch_size", "model.tiny_random",
            "model.tiny.width", "stage2.total_epochs", "data.dataset_extra", "mydata.dataset"):
    assert renamed.new_name(f) is None, f


def test_every_new_name_exists_in_a_family_config():
  """The table points at fields that exist (the renamed-to side is checked, not assumed)."""
  trees = [clipreid_config.base_config(), lpt_config.base_config("lpt"),
           coop_config.base_config()]

  def has(tree, dotted):
    node = tree
    for part in dotted.split("."):
      if not hasattr(node, "keys") or part not in node:
        return False
      node = node[part]
    return True

  for old, new in renamed.RENAMED.items():
    assert any(has(t, new) for t in trees), new
    assert not any(has(t, old) for t in trees), old
  assert has(clipreid_config.base_config(), "model.tiny.width")


def test_hint_message():
  assert renamed.hint(["--config.model.weights=x", "--stage=eval"]) is None
  msg = renamed.hint(["--config=configs/lpt/places_lt_lpt.py", "--config.model.vit_weights=w.npz"])
  assert msg == "renamed config field: --config.model.vit_weights is now --config.model.weights"


def test_launcher_names_the_new_field():
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                      "--config=configs/lpt/places_lt_lpt.py", "--config.data.dataset=list"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 2
  assert "--config.data.dataset is now --config.data.name" in p.stderr
