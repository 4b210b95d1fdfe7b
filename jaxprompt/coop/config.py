"""The CoOp / CoCoOp recipe (KaiyangZhou/CoOp configs/trainers/{CoOp,CoCoOp}/*.yaml with the
KaiyangZhou/Dassl.pytorch defaults they inherit), as one ml_collections config.

`method`: 'coop' | 'cocoop' | 'zeroshot' | 'linear_probe'.
`protocol`: 'fewshot' (train and test on all classes), 'base2new' (train on the base half,
test base and new), 'transfer' (train on `data.name`, test on each of `eval.targets` with
their own class names: cross-dataset and domain generalisation).
"""
from __future__ import annotations

import os

import ml_collections

from jaxprompt.coop import data as data_lib
from jaxprompt.coop import model as model_lib
from jaxprompt.coop import paper
from jaxprompt import trainer
from jaxprompt import validate

# Only the prompt learner trains (`prompt/ctx`, CoCoOp's `prompt/meta_net/...`); CLIP is frozen.
TRAIN_RULES = (("prompt/.*", "train"), (".*", "freeze"))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.pipeline = "coop"
  c.method = "coop"
  c.protocol = "fewshot"
  c.backbone = "RN50"           # informational; the architecture comes from the weights
  c.precision = "float32"       # compute dtype of the frozen towers ('bfloat16' on GPU/TPU)
  c.model = ml_collections.ConfigDict(dict(
      weights="",               # OpenAI/open_clip checkpoint (.pt, .npz, .safetensors)
      image_size=224,
      # The authors' released prompt learner, evaluated instead of training; '{seed}' is
      # replaced by the seed: .../seed{seed}/prompt_learner/model.pth.tar-50
      released_checkpoint="",
  ))
  c.prompt = ml_collections.ConfigDict(dict(
      n_ctx=16, ctx_init="", csc=False, class_token_position="end"))
  c.data = ml_collections.ConfigDict(dict(
      name="caltech101", root="", shots=16, classnames_file="",
      batch_size=32, workers=4,
      crop_scale=(0.08, 1.0)))  # RandomResizedCrop's area range (Dassl's default)
  c.seeds = (1, 2, 3)
  # Training stage: SGD 0.002, momentum 0.9, coupled weight decay 5e-4, one constant warmup
  # epoch at 1e-5, then cosine over all epochs, stepped per epoch.
  c.train = trainer.stage_defaults()
  c.train.total_epochs = 200
  c.train.optimizer.name = "sgd"
  c.train.optimizer.lr = 0.002
  c.train.optimizer.weight_decay = 5e-4
  c.train.optimizer.hparams = ml_collections.ConfigDict(dict(momentum=0.9))
  c.train.rules = TRAIN_RULES   # [(regex, 'freeze' | 'train' | {lr_mult, wd_mult})], first match wins
  c.train.warmup_lr = 1e-5
  c.train.warmup_epochs = 1
  c.train.ckpt_every_steps = 500
  c.train.log_every_steps = 20
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=100,           # test images per batch
      targets=(),               # transfer: dataset names evaluated with their class names
      chunk=0,                  # classes per text-encoder chunk (0: all at once)
      remat=False,              # recompute each chunk's text pass in the backward pass
      train_chunk=0,
  ))
  c.ensemble = False           # zero-shot: the ImageNet prompt ensemble instead of one template
  c.linear_probe = ml_collections.ConfigDict(dict(max_iter=1000, search_steps=8))
  # The paper's numbers for the table printed beside ours: {metric: value}, e.g. base/new/H,
  # 'acc', or one per transfer target.
  c.paper = ml_collections.ConfigDict()
  return c


def coop_rn50_fewshot(dataset: str = "caltech101", shots: int = 16, *, csc: bool = False,
                      position: str = "end") -> ml_collections.ConfigDict:
  """CoOp's few-shot table: RN50, M=16 random init, epochs by shots (KaiyangZhou/CoOp COOP.md)."""
  c = base_config()
  c.data.name, c.data.shots = dataset, shots
  c.prompt.csc, c.prompt.class_token_position = csc, position
  if dataset == "imagenet":
    c.train.total_epochs = 50
  else:
    c.train.total_epochs = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}[shots]
  return c


def base2new(method: str, dataset: str) -> ml_collections.ConfigDict:
  """CoCoOp's base-to-new benchmark on ViT-B/16, M=4 from "a photo of a".

  CoCoOp: batch 1, 10 epochs. CoOp in that benchmark: batch 32, 200 epochs (50 on ImageNet).
  """
  c = base_config()
  c.method, c.protocol, c.backbone = method, "base2new", "ViT-B/16"
  c.prompt.ctx_init = "a photo of a"
  c.prompt.n_ctx = 4
  c.data.name = dataset
  if method == "cocoop":
    c.data.batch_size = 1
    c.train.total_epochs = 10
    c.eval.chunk = 100
    c.eval.train_chunk = 100
    c.eval.remat = True
  else:
    c.train.total_epochs = 50 if dataset == "imagenet" else 200
  return c


BACKBONES = ("RN50", "RN101", "ViT-B/32", "ViT-B/16")


def coop_robustness(backbone: str = "RN50", n_ctx: int = 16) -> ml_collections.ConfigDict:
  """CoOp's robustness table: trained on ImageNet (16 shots, 50 epochs, batch 32), evaluated
  on ImageNet-V2, -Sketch, -A and -R with their class names. M=16 is random init; M=4 starts
  from "a photo of a" (KaiyangZhou/CoOp scripts/coop/main.sh, eval.sh)."""
  if backbone not in BACKBONES:
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
  if int(n_ctx) not in (4, 16):
    raise ValueError(f"n_ctx must be 16 (random init) or 4 ('a photo of a'), got {n_ctx!r}")
  c = coop_rn50_fewshot("imagenet", 16)
  c.protocol, c.backbone = "transfer", backbone
  if int(n_ctx) == 4:
    c.prompt.ctx_init = "a photo of a"
  c.prompt.n_ctx = int(n_ctx)
  c.eval.targets = paper.DG_TARGETS
  c.paper = paper.robustness(backbone, int(n_ctx))
  return c


def tiny(config: ml_collections.ConfigDict, root: str, weights: str) -> ml_collections.ConfigDict:
  """`config` (any row) shrunk to run in seconds on a folder-per-class set `root`
  (`root/train/<class>/`, `root/test/<class>/`, e.g. what `jaxprompt.coop.demo.write_folder`
  writes) with the CLIP checkpoint `weights` at 32x32 input: 4 shots, 4-image batches,
  2 context tokens unless an init phrase fixes them, 2 epochs stopped after 2 steps.

  Method, protocol, prompt layout (CSC, class-token position, init phrase), optimizer and
  schedule shape are kept; transfer targets are dropped (the folder set has none).
  """
  c = config.copy_and_resolve_references()
  c.model.weights, c.model.image_size, c.model.released_checkpoint = weights, 32, ""
  c.data.name, c.data.root, c.data.classnames_file = "folder", root, ""
  c.data.shots, c.data.batch_size, c.data.workers = 4, 4, 0
  c.eval.batch_size, c.eval.targets = 16, ()
  c.eval.chunk = min(int(c.eval.chunk), 2)
  c.eval.train_chunk = min(int(c.eval.train_chunk), 2)
  if c.protocol == "transfer":
    c.protocol = "fewshot"
  c.seeds = (1,)
  c.prompt.n_ctx = 2
  t = c.train
  t.total_epochs = 2   # the per-epoch schedule needs an epoch count; total_steps cuts it short
  t.total_steps = 2
  t.log_every_steps = 1
  t.ckpt_every_steps = 0
  t.progress = False
  t.async_checkpoints = False
  return c


__all__ = ["base_config", "coop_rn50_fewshot", "base2new", "coop_robustness", "tiny"]


def validate_config(config) -> None:
  """Types and values of the fields the CoOp / CoCoOp pipeline reads, each error naming its
  field (`launch.py` calls this before any work starts)."""
  v = validate
  v.one_of(config, "method", ("coop", "cocoop", "zeroshot", "linear_probe"))
  v.one_of(config, "protocol", ("fewshot", "base2new", "transfer"))
  v.one_of(config, "data.name", tuple(data_lib.DATASETS))
  for target in v.sequence(config, "eval.targets"):
    name, _, root = str(target).partition("@")  # 'name' under data.root, or 'name@root'
    if name not in data_lib.DATASETS:
      raise validate.ConfigError(f"eval.targets: unknown dataset {name!r} in {target!r}; "
                                 f"expected one of {tuple(data_lib.DATASETS)}")
    if root and not os.path.isdir(os.path.expanduser(root)):
      raise FileNotFoundError(f"eval.targets: folder not found: {root} (in {target!r})")
  v.existing_path(config, "data.root", kind="dir")
  v.existing_path(config, "data.classnames_file", kind="file")
  v.integer(config, "data.shots", minimum=0)
  v.positive(config, "data.batch_size")
  v.positive(config, "eval.batch_size")
  v.integer(config, "data.workers", minimum=0)
  v.positive(config, "model.image_size")
  v.precision(config, "precision")
  v.integer(config, "prompt.n_ctx", minimum=0)
  v.one_of(config, "prompt.class_token_position", model_lib.POSITIONS)
  seeds = v.sequence(config, "seeds", item=lambda s: isinstance(s, int) and not isinstance(s, bool))
  if not seeds:
    raise validate.ConfigError("seeds must hold at least one integer seed, got ()")
  if config.method in ("coop", "cocoop") and not config.model.released_checkpoint:
    v.stage_fields(config, "train")
  v.integer(config, "eval.chunk", minimum=0)
  v.existing_path(config, "model.weights", kind="file", required=True)
