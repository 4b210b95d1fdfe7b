"""Fidelity checks against DongSky/LPT and KMnP/vpt (one section per defect of the comparison)."""
from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import pytest

from jaxprompt.lpt import baselines as vpt
from jaxprompt.lpt import config as lpt_config
from jaxprompt.lpt import context as cls_common
from jaxprompt.lpt import evaluate as lpt_evaluate
from jaxprompt.lpt import train as lpt

TINY = dict(width=64, depth=3, heads=1, mlp_dim=128, patch=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method: str = "lpt", epochs: int = 2, **kw):
  c = lpt.paper_config("synthetic", method, tiny_random=TINY, image_size=16, batch_size=16,
                       epochs=epochs, **kw)
  c.model.prompt_length = 2
  c.model.pool_size = 4
  c.model.group_layers = 1
  c.data.workers = 0
  c.eval.batch_size = 16
  c.eval.plots = False
  for s in lpt_config.stage_names(method):
    c[s].progress = False
    c[s].log_every_steps = 1000
  return c


def _config_file(name: str):
  path = os.path.join(ROOT, "configs", "lpt", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# ------------------------------------------------------------------------------------------
# Item 3: the "balanced sampling" baselines are what the paper's numbers say they are.


def test_linear_balanced_is_phase1_recipe_without_prompt_or_agcl():
  # Table 8 row (a) (phase 1, no prompt, no A-GCL) reports Table 1's "linear, balanced".
  mod = _config_file("places_lt_linear_balanced.py")
  c = mod.get_config()
  p1 = lpt.paper_config("places_lt", "lpt").phase1
  o, r = c.train.optimizer, p1.optimizer
  assert c.method == "linear" and c.loss.kind == "ce"
  assert (c.model.head, c.data.sampling, c.data.batch_size) == ("cosine", "dual", 256)
  assert c.model.dropout == 0.1
  assert (o.name, o.lr, o.weight_decay, o.schedule, o.warmup_epochs, o.warmup_lr_init) == (
      r.name, r.lr, r.weight_decay, r.schedule, r.warmup_epochs, r.warmup_lr_init)
  assert c.train.total_epochs == p1.total_epochs
  assert "Table 8" in mod.__doc__ and "A-GCL" in mod.__doc__


def test_vpt_balanced_is_vpt_recipe_with_class_balanced_sampling():
  # Table 8 row (b) (prompt + phase 1 without A-GCL) is 49.10, not Table 1's 44.17.
  mod = _config_file("places_lt_vpt_balanced.py")
  c = mod.get_config()
  plain = _config_file("places_lt_vpt.py").get_config()
  assert c.loss.kind == "ce" and c.model.head == "linear"
  assert c.data.sampling == "class_aware"
  for key in ("train", "model", "loss"):
    assert c[key].to_dict() == plain[key].to_dict(), key
  assert {k: v for k, v in c.data.to_dict().items() if k != "sampling"} == \
      {k: v for k, v in plain.data.to_dict().items() if k != "sampling"}
  assert "49.10" in mod.__doc__ and "class-balanced" in mod.__doc__


def test_balanced_rows_train_with_ce_on_tiny_data(tmp_path):
  for method in ("linear", "vpt_deep"):
    c = tiny_config(method, epochs=1, balanced=True)
    res = vpt.run(c, str(tmp_path / method))
    assert 0.0 <= res["eval"]["train"]["overall"] <= 100.0


# ------------------------------------------------------------------------------------------
# Item 4: one VPT configuration (KMnP/vpt configs/prompt/cub.yaml, configs/linear/cub.yaml).


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow"])
def test_vpt_recipe_is_prompt_cub_yaml(method):
  c = lpt.paper_config("places_lt", method)
  o = c.train.optimizer
  # configs/base-prompt.yaml: batch 128, 100 epochs, 10 warm-up; prompt/cub.yaml: lr 0.1, wd 0.01.
  assert c.data.batch_size == 128 and c.train.total_epochs == 100 and o.warmup_epochs == 10
  assert lpt_config.BASE_LR_AT_256["baselines"] == 0.1 and o.lr == pytest.approx(0.1 * 128 / 256)
  assert o.weight_decay == 0.01
  assert "configs/prompt/cub.yaml" in c.recipe_notes


def test_linear_probe_recipe_is_linear_cub_yaml():
  c = lpt.paper_config("places_lt", "linear")
  o = c.train.optimizer
  # configs/base-linear.yaml: batch 1024; linear/cub.yaml: lr 0.1, wd 0.01.
  assert c.data.batch_size == 1024 and c.train.total_epochs == 100 and o.warmup_epochs == 10
  assert o.lr == pytest.approx(0.1 * 1024 / 256) and o.weight_decay == 0.01
  assert "configs/linear/cub.yaml" in c.recipe_notes


def test_vpt_configs_say_which_lpt_settings_they_share():
  for name in ("places_lt_vpt.py", "places_lt_linear.py", "cifar100_lt_r100_vpt.py"):
    doc = _config_file(name).__doc__
    assert "cub.yaml" in doc, name
    for shared in ("LayerNorm", "0.5", "RandomResizedCrop"):
      assert shared in doc, (name, shared)


# ------------------------------------------------------------------------------------------
# Item 6: the CIFAR-100-LT subset is built with seed 42 whatever the run seed.


def test_cifar100_lt_subset_does_not_depend_on_the_run_seed(monkeypatch):
  from jaxprompt.lpt import data as longtail

  def fake_read(root, split):
    n = 500 if split == "train" else 100
    labels = np.repeat(np.arange(100), n)
    images = np.arange(labels.size, dtype=np.int64).reshape(-1, 1, 1, 1)  # the index as pixel
    return images, labels, []

  monkeypatch.setattr(longtail, "read_cifar100_python", fake_read)
  picked = {}
  for seed in (7, 42, 1234):
    c = lpt.paper_config("cifar100_lt", "lpt", imbalance_ratio=100, seed=seed)
    train, _ = longtail.load_datasets(c)
    picked[seed] = [int(r.image.reshape(-1)[0]) for r in train.records]
  # DongSky/LPT phase2_test/vtab/imbalanced_cifar.py under np.random.seed(42).
  want = longtail.cifar_lt_select(np.repeat(np.arange(100), 500), 100, 42, num_classes=100)
  for seed, got in picked.items():
    assert got == want.tolist(), seed


# ------------------------------------------------------------------------------------------
# Item 7: every stage has its own PRNG stream (the run seed folded with the stage name).


class _Stop(Exception):
  pass


def _capture_stage_seeds(monkeypatch, seen, run):
  """Runs `run` until the trainer is called; records the seed it is handed."""
  from jaxprompt import trainer

  def fake(cfg, *, stage, **kw):
    seen[stage] = int(cfg.seed)
    raise _Stop(stage)

  monkeypatch.setattr(trainer, "run_stage", fake)
  with pytest.raises(_Stop):
    run()


def test_lpt_phases_have_their_own_prng_streams(tmp_path, monkeypatch):
  from jaxprompt import seeds
  c = tiny_config("lpt", epochs=1)
  seen = {}
  for stage in ("phase1", "phase2"):
    _capture_stage_seeds(monkeypatch, seen, lambda: lpt.run(c, str(tmp_path), stage))
  assert seen["phase1"] != seen["phase2"]
  assert seen == {s: seeds.stage_seed(42, s) for s in ("phase1", "phase2")}
  # The stage key is fold_in(key(seed), crc32(stage)): distinct draws per stage and seed.
  draws = {(s, n): float(jax.random.uniform(jax.random.key(seeds.stage_seed(s, n))))
           for s in (0, 42) for n in ("phase1", "phase2", "train")}
  assert len(set(draws.values())) == len(draws)
  assert c.phase1.seed == c.phase2.seed == 42  # the configs (and loaders) keep the run seed


def test_clipreid_stages_have_their_own_prng_streams(tmp_path, monkeypatch):
  from jaxprompt import seeds
  from jaxprompt.clipreid import train as clipreid
  from test_clipreid_pipeline import make_market, tiny_config as reid_tiny_config
  root = make_market(str(tmp_path / "market"))
  c = reid_tiny_config(root, "vit")
  seen = {}
  for stage in ("stage1", "stage2"):
    _capture_stage_seeds(monkeypatch, seen, lambda: clipreid.run(c, str(tmp_path / "run"), stage))
  assert seen["stage1"] != seen["stage2"]
  assert seen == {s: seeds.stage_seed(int(c.seed), s) for s in ("stage1", "stage2")}


def test_coop_training_has_its_own_prng_stream(tmp_path, monkeypatch):
  from jaxprompt import seeds
  from jaxprompt.coop import demo
  from jaxprompt.coop import train as coop
  from test_coop_train import _config as coop_config, _tiny_clip_npz
  names = demo.CLASSES[:4]
  for split, n, seed in (("train", 2, 0), ("test", 1, 1)):
    demo.write_folder(str(tmp_path / "data" / split), n, seed, names)
  c = coop_config(str(tmp_path / "data"), "coop", _tiny_clip_npz(str(tmp_path / "clip.npz")))
  c.seeds = (3,)
  seen = {}
  _capture_stage_seeds(monkeypatch, seen, lambda: coop.run(c, str(tmp_path / "run"), "train"))
  # The per-seed run seed (3), folded with the stage name like every other pipeline's stage.
  assert seen == {"train": seeds.stage_seed(3, "train")} and seen["train"] != 3


# ------------------------------------------------------------------------------------------
# Item 9: a tower file with a pre-logits layer (ViT-paper weights) is flagged clearly.


def _tower_files(tmp_path):
  from jaxprompt.convert.io import write_arrays
  from test_vit import make_timm, state_dict, to_augreg
  sd = state_dict(make_timm(patch=8, dim=64, num_classes=10, seed=1))
  files = {}
  files["augreg"] = str(tmp_path / "B_16-i21k-augreg.npz")
  write_arrays(files["augreg"], to_augreg(sd, heads=1))
  files["augreg_pre"] = str(tmp_path / "imagenet21k_ViT-B_16.npz")
  write_arrays(files["augreg_pre"], {**to_augreg(sd, heads=1),
                                     "pre_logits/kernel": np.zeros((64, 64), np.float32),
                                     "pre_logits/bias": np.zeros((64,), np.float32)})
  files["timm_pre"] = str(tmp_path / "jx_vit_base_patch16_224_in21k.npz")
  write_arrays(files["timm_pre"], {**sd, "pre_logits.fc.weight": np.zeros((64, 64), np.float32),
                                   "pre_logits.fc.bias": np.zeros((64,), np.float32)})
  return files


@pytest.mark.parametrize("method", ["lpt", "vpt_deep"])
def test_pre_logits_tower_file_warns_naming_file_and_expectation(tmp_path, method, recwarn):
  files = _tower_files(tmp_path)
  for kind in ("augreg_pre", "timm_pre"):
    c = lpt.paper_config("synthetic", method, weights=files[kind], image_size=32)
    with pytest.warns(UserWarning) as rec:
      cls_common.build_vit(c)
    msg = " ".join(str(w.message) for w in rec)
    assert files[kind] in msg and "pre-logits" in msg, msg
    assert "AugReg" in msg and "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0" in msg
  recwarn.clear()
  cls_common.build_vit(lpt.paper_config("synthetic", method, weights=files["augreg"],
                                        image_size=32))
  assert not [w for w in recwarn if "pre-logits" in str(w.message)]


# ------------------------------------------------------------------------------------------
# Item 10: LPT's feature dropout reaches both halves of the dual (CB + IB) batch.


@pytest.mark.parametrize("phase", [1, 2])
def test_dropout_reaches_both_halves_of_the_dual_batch(phase):
  from jaxprompt.lpt import model as lpt_model
  c = tiny_config("lpt")
  setup = cls_common.Context(c)
  params = jax.device_get(setup.init_params())
  fwd = lpt.phase1_forward(setup) if phase == 1 else lpt.phase2_forward(setup)
  seen = []

  def recording(p, images, rng):
    out = fwd(p, images, rng)
    seen.append((images, out["logits"]))
    return out

  b = 8
  x = np.asarray(jax.random.normal(jax.random.key(0), (b, 16, 16, 3)), np.float32)
  y = np.arange(b, dtype=np.int32) % setup.train.num_classes
  # Identical CB and IB images: only dropout can make the two halves' logits differ.
  batch = {"cb": {"image": x, "label": y}, "ib": {"image": x, "label": y},
           "ib_weight": np.full((b,), 0.5, np.float32)}
  loss_fn = cls_common.make_loss_fn(c, recording, setup.counts)
  loss_fn(params, {}, batch, jax.random.key(1))
  images, logits = seen[0]
  assert images.shape[0] == 2 * b  # one forward over both halves
  if phase == 1:
    clean = lpt_model.classifier_forward(setup.vit, params, x, setup.spec, rng=None)
  else:
    clean = lpt_model.phase2_forward(setup.vit, params, x, setup.spec, rng=None,
                                     fused=True)["logits"]
  cb, ib = np.asarray(logits[:b]), np.asarray(logits[b:])
  clean = np.asarray(clean)
  assert np.abs(cb - clean).max() > 1e-4  # dropout on the CB half
  assert np.abs(ib - clean).max() > 1e-4  # and on the IB half
  assert np.abs(cb - ib).max() > 1e-4     # with independent masks
  assert c.model.dropout == 0.1


# ------------------------------------------------------------------------------------------
# Item 5: eval.select = 'last' (default) | 'best' (the reference's max-va.pth, on the test set).


def test_select_defaults_to_last_and_is_documented():
  for method in ("lpt", "vpt_deep", "linear"):
    assert lpt.paper_config("places_lt", method).eval.select == "last"
  doc = " ".join(_config_file("places_lt_lpt.py").__doc__.split())
  assert "eval.select" in doc and "max-va.pth" in doc and "test" in doc


def test_select_best_keeps_the_best_test_epoch(tmp_path):
  c = tiny_config("vpt_deep", epochs=4)
  c.eval.select = "best"
  wd = str(tmp_path / "run")
  res = vpt.run(c, wd)["eval"]["train"]
  best = lpt_evaluate.read_best(wd, "train")
  assert 0 <= best["epoch"] < 4 and res["select"] == "best" and res["best_epoch"] == best["epoch"]
  history = best["history"]
  assert len(history) == 4 and best["overall"] == max(history)
  assert best["epoch"] == int(np.argmax(history))
  assert res["overall"] == pytest.approx(best["overall"], abs=1e-9)
  # 'last' on the same run evaluates the final checkpoint, whose accuracy is the last epoch's.
  c.eval.select = "last"
  last = vpt.run(c, wd, stage="eval")["eval"]["train"]
  assert last["overall"] == pytest.approx(history[-1], abs=1e-9)
  c.eval.select = "worst"
  with pytest.raises(ValueError, match="eval.select"):
    vpt.run(c, wd, stage="eval")


def test_select_best_needs_a_run_trained_with_it(tmp_path):
  c = tiny_config("vpt_deep", epochs=1)
  wd = str(tmp_path / "run")
  vpt.run(c, wd)
  c.eval.select = "best"
  with pytest.raises(FileNotFoundError, match="eval.select='best'"):
    vpt.run(c, wd, stage="eval")


def test_select_best_runs_both_lpt_phases(tmp_path):
  c = tiny_config("lpt", epochs=2)
  c.eval.select = "best"
  res = lpt.run(c, str(tmp_path / "run"))["eval"]
  for stage in ("phase1", "phase2"):
    best = lpt_evaluate.read_best(str(tmp_path / "run"), stage)
    assert len(best["history"]) == 2 and res[stage]["best_epoch"] == best["epoch"]
    assert res[stage]["overall"] == pytest.approx(best["overall"], abs=1e-9)
