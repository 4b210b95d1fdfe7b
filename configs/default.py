"""The default job: CLIP-ReID, LPT and CoOp/CoCoOp end to end on self-built data, offline, on CPU.

  python launch.py                                        # (make run) into workdir/default
  python launch.py --config configs/default.py:small      # the reduced size the tests use
  python launch.py --stage report                         # print the table again
  python launch.py --config.seed=1                        # the whole job on another seed

Offline, from self-built data, through the same readers, samplers, steps, checkpoints and
evaluators as the paper configs (see `jaxprompt/demo/job.py` for the stages):

* re-identification: a synthetic set in Market-1501's exact layout and naming (100 train /
  30 test identities, 6 cameras, 64x32 images) and CLIP-ReID with a tiny randomly initialised
  CLIP (ViT, width 64, 2 layers); the pipeline's eval on the random model ("untrained"),
  then stage 1 (40 epochs) and stage 2 (60 epochs) and eval;
* long tail: scikit-learn's digits as a long-tailed set (150 .. 5 train images per class,
  imbalance 30; 20 test images per class), a tiny ViT (width 64, depth 4) pretrained for
  1000 steps on procedural glyphs and frozen, LPT phase 1 + phase 2 (40 epochs each) and a
  linear probe (40 epochs) on it;
* text prompts: a tiny CLIP pretrained contrastively for 250 steps on generated captions of
  24 colour-shape classes (30% of the pairs warm-lit, captioned "a warm photo of a {}."), then
  zero-shot CLIP, CoOp and CoCoOp (4 tokens from "a photo of a", 8 shots, 20 epochs) on fresh
  warm-lit images, 12 base and 12 new classes (`jaxprompt/coop/demo.py`).

A fresh clone's run on 2 CPU cores (a quiet AMD EPYC, seed 0) took 5m17s (data + pretraining
1m38s, CLIP-ReID 1m34s, LPT + linear 1m27s, text prompts 37s) and printed (mAP / R1 / R5 and
accuracies in %; the README gives seeds 1 and 2 and the spread, e.g. CoOp base 73.4 +- 19.5
and CoCoOp H 69.0 +- 21.5 against zero-shot's 58.8 +- 22.4 and 64.2 +- 19.7):

| task      | model                               |  mAP |   R1 |   R5 | overall | many | medium |  few | base |  new |    H |
|-----------|-------------------------------------|-----:|-----:|-----:|--------:|-----:|-------:|-----:|-----:|-----:|-----:|
| ReID      | CLIP-ReID, untrained (random init)  |  2.8 |  0.0 |  1.5 |         |      |        |      |      |      |      |
| ReID      | CLIP-ReID, stage 1 + stage 2        | 40.4 | 40.9 | 80.3 |         |      |        |      |      |      |      |
| LT digits | linear probe (frozen ViT)           |      |      |      |    40.5 | 95.0 |   38.8 | 15.0 |      |      |      |
| LT digits | LPT phase 1 (shared prompt)         |      |      |      |    42.5 | 70.0 |   35.0 | 36.2 |      |      |      |
| LT digits | LPT phase 2 (shared + group)        |      |      |      |    50.0 | 77.5 |   42.5 | 43.8 |      |      |      |
| shapes    | zero-shot CLIP ('a photo of a {}.') |      |      |      |         |      |        |      | 29.2 | 48.6 | 36.5 |
| shapes    | CoOp (4 context tokens)             |      |      |      |         |      |        |      | 45.8 | 26.4 | 33.5 |
| shapes    | CoCoOp (4 tokens + Meta-Net)        |      |      |      |         |      |        |      | 34.7 | 44.4 | 39.0 |

The untrained model scores about chance level (random ranking of a ~320-image gallery).

Sizes: the argument after ':' picks `full` (default) or `small` (the test).
Any field can be overridden, e.g. `--config.clipreid.stage2.total_epochs=80` or
`--config.lpt.phase2.optimizer.lr=0.05`; empty data / weight fields of the sub-configs are
filled with what the `data` stage wrote. Tuple fields take tuples, e.g.
`--config.clipreid.stage2.lr_schedule.milestones='(30, 45)'`; `--config.seed=N` moves every
sub-seed of the job (data, pretraining, each pipeline's seed) by N.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from jaxprompt.clipreid import config as clipreid
from jaxprompt.lpt import config as lpt_config

SIZES = ("full", "small")


def _offset(ref: ml_collections.FieldReference, base: int) -> ml_collections.FieldReference:
  """`base` + the job's `seed`, lazily: `--config.seed=N` moves every sub-seed built with it."""
  return ref + int(base)


def _clipreid(size: str, seed: ml_collections.FieldReference) -> ml_collections.ConfigDict:
  """CLIP-ReID's Market-1501 recipe with a tiny random CLIP and a demo-sized schedule."""
  small = size == "small"
  c = clipreid.paper_config("market1501", "vit_b16", "clipreid")
  # The stages' seeds reference the pipeline's `seed`: setting that reference moves them too.
  c.get_ref("seed").set(_offset(seed, 1234))
  c.model.tiny_random = True
  t = c.model.tiny
  t.seed = _offset(seed, 0)
  t.vision = "vit"
  t.width, t.layers, t.heads, t.patch_size = 64, 2, 4, 8
  t.embed_dim, t.text_width, t.text_heads, t.text_layers = 64, 32, 2, 1
  c.model.stride = 8
  c.data.size = (64, 32)
  c.data.workers = 2
  c.data.num_instances = 4
  c.stage1.batch_size = 64
  c.stage1.total_epochs = 20 if small else 40
  c.stage1.optimizer.lr = 3.5e-3
  c.stage1.lr_schedule.warmup_t = 2
  # A random tower needs far more than the paper's 5e-6 (which fine-tunes pretrained CLIP).
  c.stage2.batch_size = 64
  c.stage2.total_epochs = 40 if small else 60
  c.stage2.optimizer.lr = 3e-3
  c.stage2.lr_schedule.milestones = (28, 36) if small else (40, 52)
  c.stage2.lr_schedule.warmup_iters = 2
  for s in (c.stage1, c.stage2):
    s.log_every_steps = 5
    s.ckpt_every_steps = 0
  c.eval.batch_size = 128
  c.eval.grid_queries = 8
  c.eval.grid_topk = 8
  return c


def _cls(method: str, size: str, seed: ml_collections.FieldReference
         ) -> ml_collections.ConfigDict:
  """LPT or the linear probe on the digits list, the pretrained tiny ViT, demo schedule."""
  small = size == "small"
  epochs = 20 if small else 40
  c = lpt_config.paper_config("list", method, image_size=16, batch_size=64, epochs=epochs)
  c.get_ref("seed").set(_offset(seed, 42))
  c.data.num_classes = 10
  c.data.workers = 2
  c.data.resize = 18
  c.data.crop_scale = (0.5, 1.0)  # 16-px digits: the 0.08 lower bound leaves a stroke or two
  c.eval.batch_size = 100
  c.model.dropout = 0.0
  if method == "lpt":
    c.model.prompt_length = 4
    c.model.pool_size = 8
    c.model.group_layers = 2
    # Few steps per epoch (dual sampling, 462 images): a larger lr than 0.02 x 64 / 256.
    for s in ("phase1", "phase2"):
      c[s].optimizer.lr = 0.1
  else:
    c.train.optimizer.lr = 0.1  # same lr, epochs and batch as LPT: a like-for-like probe
    c.train.optimizer.weight_decay = 1e-4  # the value the table above was measured with
    c.train.optimizer.warmup_epochs = 2
  for s in lpt_config.stage_names(method):
    c[s].log_every_steps = 5
    c[s].ckpt_every_steps = 0  # final checkpoints only: stages last seconds
  return c


def get_config(size: Optional[str] = None) -> ml_collections.ConfigDict:
  size = size or "full"
  if size not in SIZES:
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")
  small = size == "small"
  c = ml_collections.ConfigDict()
  c.pipeline = "default"
  c.size = size
  # The job's seed: every sub-seed below is a fixed offset from it (data, pretraining, each
  # pipeline's seed), so `--config.seed=N` reruns the whole job on another draw.
  c.seed = 0
  seed = c.get_ref("seed")
  c.reid_data = ml_collections.ConfigDict(dict(
      num_train_ids=60 if small else 100, num_test_ids=20 if small else 30, cams=6,
      images_per_id_cam=4, cams_per_id=(2, 4), num_distractors=12, num_junk=6,
      size=(64, 32), seed=_offset(seed, 0)))
  c.digits = ml_collections.ConfigDict(dict(
      imbalance=30.0, max_per_class=150, test_per_class=20, image_size=16,
      seed=_offset(seed, 0)))
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=300 if small else 1000, seed=_offset(seed, 0), width=64, depth=4, heads=2,
      mlp_ratio=4, patch=4,
      image_size=16, batch_size=128, learning_rate=3e-3, weight_decay=0.05, warmup_steps=30,
      ln_eps=1e-5))  # LPT's tower uses torch's LayerNorm eps
  c.clipreid = _clipreid(size, seed)
  c.lpt = _cls("lpt", size, seed)
  c.linear = _cls("linear", size, seed)
  # CoOp / CoCoOp on a tiny CLIP pretrained on generated captions (jaxprompt/coop/demo.py);
  # `seed` is the few-shot sampling and prompt-init seed of the CoOp pipeline. The
  # classification images are warm-lit, a domain the pretraining captions name ('a warm photo
  # of a {}.') and the hand prompt 'a photo of a {}.' does not: the learned context has
  # something to find. (With plain images the hand prompt was as good as any text, the image
  # tower was the limit, and CoOp gained nothing.)
  c.coop = ml_collections.ConfigDict(dict(
      pretrain_steps=250, per_class_test=6 if small else 12, seed=1,
      pretrain_seed=0))
  return c
