"""A two-stage toy pipeline on synthetic data, trained with the real trainer.

It mirrors the shape of the real pipelines (a tower, a `prompt` group and a
`head`; stage 1 learns prompt + head on a frozen tower, stage 2 fine-tunes the
tower and head starting from stage 1's final checkpoint) and is small enough
for tests. Test hooks in `config.data`: `delay_s` slows decoding so a test can
signal the process mid-run; `nan_at_batch` makes every sample of that global
batch NaN.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import optim
from jaxprompt import trainer
from jaxprompt.data import Loader, ShuffleSampler
from jaxprompt.optim import FREEZE, Rule
from jaxprompt.trainer import stage_defaults

STAGES = ("stage1", "stage2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The toy config; `launch.py --config tests/toy_pipeline.py` reads it directly."""
  c = ml_collections.ConfigDict()
  c.pipeline = "tests.toy_pipeline"
  c.seed = 0
  c.precision = "float32"  # 'bfloat16': bf16 compute, float32 params/optimizer/loss
  c.fsdp = 0               # 0: data parallel; n: an fsdp axis of n devices; -1: all devices

  c.data = ml_collections.ConfigDict(dict(
      seed=0, num_records=64, image_size=8, num_classes=4, batch_size=8, workers=2,
      delay_s=0.0, nan_at_batch=-1))
  c.model = ml_collections.ConfigDict(dict(width=16, dropout=0.1))

  for name, epochs, lr in (("stage1", 3, 1e-2), ("stage2", 2, 3e-3)):
    s = stage_defaults()
    s.seed = c.get_ref("seed")
    s.precision = c.get_ref("precision")
    s.fsdp = c.get_ref("fsdp")
    s.total_epochs = epochs
    s.optimizer.lr = lr
    s.ckpt_every_steps = 8
    s.log_every_steps = 4
    s.fsdp_min_size = 0
    c[name] = s
  return c


STAGE1_RULES = [("prompt/.*", Rule()), ("head/.*", Rule(lr_mult=2.0)), (".*", FREEZE)]
STAGE2_RULES = [("img/.*", Rule()), ("head/.*", Rule()), (".*", FREEZE)]


class Tower(nn.Module):
  """Dense -> BatchNorm -> add prompt -> relu: frozen 'pretrained' weights plus state."""
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, prompt: jax.Array, train: bool) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    # No bias: BatchNorm cancels it, and Adam would turn its ~0 gradient into noise.
    h = nn.Dense(self.width, use_bias=False, dtype=self.dtype, name="dense")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name="bn")(h)
    return nn.relu(h + prompt.astype(h.dtype))


def make_model(config):
  dtype = jnp.bfloat16 if config.precision in ("bfloat16", "bf16") else jnp.float32
  return Tower(config.model.width, dtype), nn.Dense(config.data.num_classes, dtype=dtype)


def init_params(config, rng: jax.Array) -> tuple[dict, dict]:
  """Full params {'img', 'prompt', 'head'} and model state {'batch_stats': {'img': ...}}."""
  tower, head = make_model(config)
  s, width = config.data.image_size, config.model.width

  @jax.jit  # one compilation instead of one per initializer op
  def init(rng):
    r_img, r_prompt, r_head = jax.random.split(rng, 3)
    v = tower.init(r_img, jnp.zeros((1, s, s, 3)), jnp.zeros((width,)), train=False)
    params = {
        "img": v["params"],
        "prompt": {"ctx": 0.02 * jax.random.normal(r_prompt, (width,))},
        "head": head.init(r_head, jnp.zeros((1, width)))["params"],
    }
    return params, {"batch_stats": {"img": v["batch_stats"]}}

  return jax.device_get(init(rng))


def make_loss_fn(config):
  tower, head = make_model(config)
  rate = float(config.model.dropout)

  def loss_fn(params, model_state, batch, rng):
    h, upd = tower.apply({"params": params["img"], "batch_stats": model_state["batch_stats"]["img"]},
                         batch["image"], params["prompt"]["ctx"], train=True,
                         mutable=["batch_stats"])
    if rate:
      keep = jax.random.bernoulli(rng, 1.0 - rate, h.shape)
      h = jnp.where(keep, h / (1.0 - rate), 0).astype(h.dtype)
    logits = head.apply({"params": params["head"]}, h).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"batch_stats": {"img": upd["batch_stats"]}}, {"accuracy": acc})

  return loss_fn


def make_records(config) -> list[tuple[np.ndarray, int]]:
  """Synthetic (class-mean + noise) images; record i is a pure function of (seed, i)."""
  d = config.data
  rng = np.random.default_rng(d.seed)
  means = rng.normal(size=(d.num_classes, d.image_size, d.image_size, 3)).astype(np.float32)
  labels = rng.integers(0, d.num_classes, d.num_records)
  noise = rng.normal(scale=0.5, size=(d.num_records, d.image_size, d.image_size, 3))
  return [((means[y] + noise[i]).astype(np.float32), int(y)) for i, y in enumerate(labels)]


def make_loader(config, seed: int) -> Loader:
  d = config.data
  sampler = ShuffleSampler(d.num_records, seed=seed)
  records = make_records(config)
  if d.nan_at_batch >= 0:
    # Poison the records that make up global batch `nan_at_batch` of epoch 0.
    order = sampler.epoch_indices(0)
    bad = set(order[d.nan_at_batch * d.batch_size:(d.nan_at_batch + 1) * d.batch_size].tolist())
    records = [(img * np.nan if i in bad else img, y) for i, (img, y) in enumerate(records)]

  def decode(record, rng):
    image, label = record
    if d.delay_s:
      time.sleep(d.delay_s)
    # Random flip + jitter: exercises the per-sample rng.
    image = image[:, ::-1] if rng.random() < 0.5 else image
    image = image + rng.normal(scale=0.05, size=image.shape).astype(np.float32)
    return {"image": image.astype(np.float32), "label": np.int32(label)}

  return Loader(records, decode, sampler, d.batch_size, seed=seed, workers=d.workers)


def run(config, workdir: str, stage: Optional[str] = None) -> dict:
  """Stage 1 then stage 2; `stage` runs (or resumes) only that one."""
  if stage is not None and stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; this pipeline has {STAGES}")
  loss_fn = make_loss_fn(config)
  results = {}

  # Stage 1: learn the prompt and the head on the frozen tower.
  if stage in (None, "stage1"):
    results["stage1"] = trainer.run_stage(
        config.stage1, workdir=workdir, stage="stage1",
        init=lambda rng: init_params(config, jax.random.key(config.seed)),
        loss_fn=loss_fn, rules=STAGE1_RULES, loader=make_loader(config, config.seed),
        frozen_source=f"toy-init(seed={config.seed})")

  # Stage 2: fine-tune the tower and head from stage 1's final checkpoint.
  if stage in (None, "stage2"):
    def init2(rng):
      params, _ = init_params(config, jax.random.key(config.seed))
      trained, model_state = ckpt_lib.read_params(workdir, "stage1")
      return optim.merge(trained, optim.split(params, STAGE1_RULES)[1]), model_state

    results["stage2"] = trainer.run_stage(
        config.stage2, workdir=workdir, stage="stage2", init=init2, loss_fn=loss_fn,
        rules=STAGE2_RULES, loader=make_loader(config, config.seed + 1),
        frozen_source="stage1")
  return results
