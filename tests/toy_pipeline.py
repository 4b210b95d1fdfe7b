"""A two-stage toy pipeline on synthetic data, trained with the real trainer.

It mirrors the shape of the real pipelines (a tower, a `prompt` group and a
`head`; stage 1 learns prompt + head on a frozen tower, stage 2 fine-tunes the
tower and head starting from stage 1's final checkpoint) and is small enough
for tests. Like the real pipelines it caches "features" before stage 1 and
evaluates after stage 2 (both loops wrapped in `metrics.progress`).

Test hooks: `data.delay_s` slows decoding so a test can signal the process
mid-run; `data.nan_at_batch` makes every sample of that global batch NaN;
`data.cache_delay_s` / `data.eval_delay_s` slow the caching / evaluation loops
(per record / per batch); `data.step_delay_s` makes every train step take that
long on the device (a host callback), for throughput tests; `<stage>.lr_spike_at`
sets the learning rate of that step to 1e30, so its *update* overflows while its
loss is finite.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics
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
      delay_s=0.0, nan_at_batch=-1, cache_delay_s=0.0, eval_delay_s=0.0, step_delay_s=0.0))
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
    s.lr_spike_at = -1
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

  delay = float(config.data.step_delay_s)

  def loss_fn(params, model_state, batch, rng):
    if delay:
      batch = dict(batch, image=_sleep_on_device(batch["image"], delay))
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


def _sleep_on_device(x: jax.Array, seconds: float) -> jax.Array:
  """`x`, once `seconds` have passed on the host while the step runs (a host callback,
  so dispatching the step returns at once, as on an accelerator)."""
  def host(v):
    time.sleep(seconds)
    return np.zeros((), np.float32)
  dep = jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float32), jnp.sum(x[:1]))
  return x + dep.astype(x.dtype)


def make_tx(cfg):
  """`run_stage`'s make_tx with the learning rate of step `cfg.lr_spike_at` set to 1e30."""
  spike, lr = int(cfg.lr_spike_at), float(cfg.optimizer.lr)

  def build(trainable, rules, total_steps):
    sched = lambda count: jnp.where(count == spike - 1, 1e30, lr)  # noqa: E731
    return optim.make_optimizer(trainable, rules, name="adam", learning_rate=sched), sched

  return build if spike > 0 else None


def cache_features(config, workdir: str) -> None:
  """A stand-in for a pipeline's feature cache: one pass over the records, then a file."""
  path = os.path.join(workdir, "feature_cache.npz")
  if os.path.exists(path):
    return
  records = make_records(config)
  feats = []
  for image, _ in metrics.progress(records, desc="caching features", unit="image"):
    if config.data.cache_delay_s:
      time.sleep(config.data.cache_delay_s)
    feats.append(image.mean())
  os.makedirs(workdir, exist_ok=True)
  np.savez(path + ".tmp.npz", feats=np.asarray(feats))
  os.replace(path + ".tmp.npz", path)


def evaluate(config, workdir: str, result) -> dict:
  """Accuracy of the final model on the training records (results.json)."""
  tower, head = make_model(config)
  variables = result.params
  model_state = result.state["model_state"]

  @jax.jit
  def predict(params, model_state, images):
    h = tower.apply({"params": params["img"], "batch_stats": model_state["batch_stats"]["img"]},
                    images, params["prompt"]["ctx"], train=False)
    return jnp.argmax(head.apply({"params": params["head"]}, h), -1)

  records = make_records(config)
  bs = int(config.data.batch_size)
  correct = 0
  for i in metrics.progress(range(0, len(records), bs), desc="evaluating"):
    if config.data.eval_delay_s:
      time.sleep(config.data.eval_delay_s)
    chunk = records[i:i + bs]
    images = np.stack([r[0] for r in chunk])
    pred = np.asarray(predict(variables, model_state, images))
    correct += int(np.sum(pred == np.asarray([r[1] for r in chunk])))
  out = {"accuracy": correct / len(records)}
  metrics.write_json(os.path.join(workdir, "results.json"), out)
  metrics.say(f"toy: accuracy {out['accuracy']:.3f}")
  return out


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
    cache_features(config, workdir)
    results["stage1"] = trainer.run_stage(
        config.stage1, workdir=workdir, stage="stage1",
        init=lambda rng: init_params(config, jax.random.key(config.seed)),
        loss_fn=loss_fn, rules=STAGE1_RULES, loader=make_loader(config, config.seed),
        make_tx=make_tx(config.stage1), frozen_source=f"toy-init(seed={config.seed})")

  # Stage 2: fine-tune the tower and head from stage 1's final checkpoint. Stage 1's
  # prompt is frozen here and carried in stage 2's checkpoints, so a resumed stage 2
  # does not read stage 1 (`resume_init` leaves the prompt's placeholder to the restore).
  if stage in (None, "stage2"):
    def resume_init2(rng):
      return init_params(config, jax.random.key(config.seed))

    def init2(rng):
      params, _ = resume_init2(rng)
      trained, model_state = ckpt_lib.read_params(workdir, "stage1")
      return optim.merge(trained, optim.split(params, STAGE1_RULES)[1]), model_state

    results["stage2"] = trainer.run_stage(
        config.stage2, workdir=workdir, stage="stage2", init=init2, loss_fn=loss_fn,
        rules=STAGE2_RULES, loader=make_loader(config, config.seed + 1),
        make_tx=make_tx(config.stage2), frozen_source="stage1",
        resume_init=resume_init2, carry=["prompt/.*"])
    results["eval"] = evaluate(config, workdir, results["stage2"])
  return results
