"""LPT / VPT pipelines end to end on a generated long-tailed set with a tiny ViT."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import optim
from jaxprompt.lpt import config as lpt_config
from jaxprompt.lpt import context as cls_common
from jaxprompt.lpt import train as lpt
from jaxprompt.lpt import baselines as vpt

TINY = dict(width=64, depth=3, heads=1, mlp_dim=128, patch=4)


def tiny_config(method: str, steps: int = 0):
  c = lpt.paper_config("synthetic", method, tiny_random=TINY, image_size=16, batch_size=16,
                       epochs=2)
  c.model.prompt_length = 2
  c.model.pool_size = 4
  c.model.group_layers = 2
  c.data.workers = 0
  c.data.resize = 18
  c.eval.batch_size = 32
  for s in lpt_config.stage_names(method):
    c[s].progress = False
    c[s].ckpt_every_steps = 5
    c[s].log_every_steps = 5
    if steps:
      c[s].total_steps = steps
  return c


def test_lpt_phase1_phase2_eval(tmp_path):
  c = tiny_config("lpt")
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(folder / f"im{i}.png")
  c.eval.predict_dir = str(folder)
  workdir = str(tmp_path / "run")
  res = lpt.run(c, workdir)

  # Checkpoints between phases: phase 2 starts from phase 1's shared prompt and head.
  p1, _ = ckpt_lib.read_params(workdir, "phase1")
  p2, _ = ckpt_lib.read_params(workdir, "phase2")
  assert set(p1["prompt"]) == {"shared"} and set(p2["prompt"]) == {"group", "keys"}
  np.testing.assert_array_equal(res["phase2"].params["prompt"]["shared"], p1["prompt"]["shared"])
  assert not np.allclose(p1["head"]["kernel"], p2["head"]["kernel"])
  setup = cls_common.Setup(c)
  init2 = cls_common.params_after(workdir, ["phase1"], setup.init_params())
  np.testing.assert_array_equal(init2["head"]["kernel"], p1["head"]["kernel"])

  # Trainable counts per phase, from the rules.
  full = res["phase2"].params
  t1, _ = optim.split(full, lpt.PHASE1_RULES)
  t2, _ = optim.split(full, lpt.PHASE2_RULES)
  n_head = 64 * 10
  assert sum(x.size for x in jax.tree.leaves(t1)) == 3 * 2 * 64 + n_head
  assert sum(x.size for x in jax.tree.leaves(t2)) == 4 * 2 * 2 * 64 + 4 * 64 + n_head
  counts = json.load(open(os.path.join(workdir, "param_counts.json")))
  assert counts["prompts"] == 3 * 2 * 64 + 4 * 2 * 2 * 64

  # Eval: per-bucket accuracy, plots and predictions.
  for stage in ("phase1", "phase2"):
    out = os.path.join(workdir, "eval", stage)
    r = json.load(open(os.path.join(out, "results.json")))
    assert r["convention"] == "lpt"
    for k in ("overall", "medium", "few"):
      assert 0.0 <= r[k] <= 100.0
    assert r["classes_per_bucket"]["many"] == 0  # counts 60..3
    assert os.path.isfile(os.path.join(out, "per_class_accuracy.png"))
    assert os.path.isfile(os.path.join(out, "bucket_accuracy.png"))
    print(stage, {k: round(r[k], 1) for k in ("overall", "many", "medium", "few")})
  assert "prompt_usage" in res["eval"]["phase2"]
  rows = open(os.path.join(workdir, "eval", "phase2", "predictions.tsv")).read().split("\n")
  assert [r.split("\t")[0] for r in rows if r] == ["im0.png", "im1.png", "im2.png"]
  # Tiny data and 2 epochs: better than chance (10 classes) after phase 2.
  assert res["eval"]["phase2"]["overall"] > 12.0

  # Rerunning the eval stage alone reads the checkpoints and gives the same numbers.
  again = lpt.run(c, workdir, stage="eval")
  assert again["eval"]["phase2"]["overall"] == res["eval"]["phase2"]["overall"]


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "linear"])
def test_vpt_and_linear_probe_run(tmp_path, method):
  c = tiny_config(method, steps=3)
  c.eval.plots = False
  res = vpt.run(c, str(tmp_path))
  assert int(jax.device_get(res["train"].state["step"])) == 3
  trained, _ = ckpt_lib.read_params(str(tmp_path), "train")
  want = {"vpt_deep": {"deep"}, "vpt_shallow": {"shallow"}, "linear": set()}[method]
  assert set(trained.get("prompt", {})) == want
  assert set(trained["head"]) == {"kernel", "bias"}
  assert 0.0 <= res["eval"]["train"]["overall"] <= 100.0


def test_paper_configs():
  for ds in ("places_lt", "cifar100_lt:10", "cifar100_lt:50", "cifar100_lt:100",
             "cifar100_lt:200", "inat2018"):
    for method in ("lpt", "vpt_deep", "vpt_shallow", "linear"):
      c = lpt.paper_config(ds, method, weights="/w.npz")
      assert c.pipeline == ("lpt" if method == "lpt" else "vpt")
      assert c.recipe_notes
  c = lpt.paper_config("places_lt", "lpt")
  assert c.phase1.optimizer.lr == pytest.approx(0.02) and c.data.batch_size == 256
  assert c.phase2.optimizer.weight_decay == 0.01 and c.phase2.total_epochs == 90
  assert c.phase1.optimizer.hparams.momentum == 0.9
  assert c.model.ln_eps == 1e-5 and tuple(c.data.mean) == (0.5, 0.5, 0.5)
  c = lpt.paper_config("cifar100_lt", "lpt", imbalance_ratio=50, batch_size=128, phase2_epochs=10)
  assert c.data.imbalance_ratio == 50 and c.phase1.optimizer.lr == pytest.approx(0.01)
  assert c.phase2.total_epochs == 10 and c.phase1.total_epochs == 90
  with pytest.raises(ValueError):
    lpt.paper_config("cifar100_lt:7", "lpt")
  with pytest.raises(ValueError):
    lpt.paper_config("places_lt", "coop")


def test_lt_transforms_shapes_and_determinism():
  from jaxprompt.lpt.transforms import lpt_test_transform, lpt_train_transform
  img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
  a = lpt_train_transform(img, np.random.default_rng(1), 16)
  b = lpt_train_transform(img, np.random.default_rng(1), 16)
  assert a.shape == (16, 16, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  t = lpt_test_transform(img, 224)
  assert t.shape == (224, 224, 3) and -1.0 <= t.min() and t.max() <= 1.0
