"""The generic stage runner and the pure train/eval steps every pipeline uses.

A pipeline supplies, per stage:

* `init(rng) -> (params, model_state)`: the full parameter tree (pretrained
  weights loaded, previous stage's results merged in) and the mutable model
  collections (e.g. `{'batch_stats': ...}`, or `{}`);
* `loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))`:
  the forward pass on the *merged* params, returning a scalar loss, the updated
  mutable collections and a dict of scalar metrics;
* `rules`: the stage's `(regex, Rule)` list (`jaxprompt.optim`);
* `loader`: a `jaxprompt.data.Loader`;
* the stage config (`cfg`): seed, duration, optimizer, mesh/sharding, precision,
  checkpoint and log intervals (see `stage_defaults()`).

`run_stage` then reads top to bottom: mesh -> init and split -> optimizer ->
shardings -> resume (this stage's checkpoints, then `cfg.resume`, then `init`)
-> jitted step -> loop with metrics, checkpoints and fault handling -> final
checkpoint, which the next stage reads with `jaxprompt.checkpoint.read_params`.

The state is a plain dict `{'params', 'model_state', 'opt', 'step'}`; frozen
weights travel separately and are never donated or checkpointed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxprompt import checkpoint as ckpt_lib
from jaxprompt import metrics as metrics_lib
from jaxprompt import optim
from jaxprompt import precision
from jaxprompt import sharding as shd

PyTree = Any
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, tuple[PyTree, Mapping[str, jax.Array]]]]
InitFn = Callable[[jax.Array], tuple[PyTree, PyTree]]


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved. Rerunning the same command resumes."""


# ============================================================== pure step functions

def train_step(state: dict, frozen: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_fn: LossFn, tx: optax.GradientTransformation,
               dtype: Any = jnp.float32) -> tuple[dict, dict]:
  """One optimizer step on the trainable params; bind `loss_fn`/`tx`/`dtype` with partial.

  `rng` is the stage's base key; the step count is folded in, so the update is a
  pure function of (state, frozen, batch, rng) and resuming reproduces it.
  """
  step_rng = jax.random.fold_in(rng, state["step"])
  frozen_c = precision.cast_floating(frozen, dtype)
  batch_c = precision.cast_floating(batch, dtype)

  def objective(trainable):
    params = optim.merge(precision.cast_floating(trainable, dtype), frozen_c)
    loss, (model_state, aux) = loss_fn(params, state["model_state"], batch_c, step_rng)
    return loss.astype(jnp.float32), (model_state, aux)

  (loss, (model_state, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # Mutable collections keep their float32 storage whatever the compute dtype.
  model_state = precision.cast_floating(model_state, jnp.float32)
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
  new_state = dict(params=params, model_state=model_state, opt=opt, step=state["step"] + 1)
  return new_state, metrics


def eval_step(state: dict, frozen: PyTree, batch: Mapping[str, jax.Array], *,
              apply_fn: Callable[[PyTree, PyTree, Mapping[str, jax.Array]], Any],
              dtype: Any = jnp.float32) -> Any:
  """`apply_fn(params, model_state, batch)` on the merged params; bind apply_fn with partial."""
  params = optim.merge(precision.cast_floating(state["params"], dtype),
                       precision.cast_floating(frozen, dtype))
  return apply_fn(params, state["model_state"], precision.cast_floating(batch, dtype))


# ============================================================== configuration

def stage_defaults() -> ml_collections.ConfigDict:
  """Every knob `run_stage` reads, with defaults. Pipelines copy this per stage."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_epochs = 0          # one of total_epochs / total_steps must be > 0
  c.total_steps = 0
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, weight_decay=0.0, coupled_decay=True,
      schedule="constant", warmup_steps=0, hparams=ml_collections.ConfigDict()))
  c.fsdp = 0                  # 0: data parallel; n>0: fsdp axis of size n; -1: all devices
  c.mesh = ml_collections.FieldReference(None, field_type=list)  # explicit [(name, size)]
  c.sharding_rules = ml_collections.FieldReference(None, field_type=list)  # [(regex, tactic)]
  c.fsdp_min_size = 2 ** 14   # leaves with fewer elements stay replicated under fsdp
  c.precision = "float32"     # or 'bfloat16' (compute only; params/opt/loss stay float32)
  c.ckpt_every_steps = 100
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.log_every_steps = 10
  c.resume = ""               # explicit checkpoint dir to start from when this stage has none
  c.progress = True
  return c


def epoch_steps(loader, epoch: int) -> int:
  return loader.steps_per_epoch(epoch)


def total_steps(loader, *, epochs: int = 0, steps: int = 0) -> int:
  """A stage's length in steps, from epochs (summing each epoch's batches) or steps."""
  if steps:
    return int(steps)
  if epochs:
    return sum(epoch_steps(loader, e) for e in range(int(epochs)))
  raise ValueError("a stage needs total_epochs or total_steps > 0")


def make_schedule(opt_cfg: Mapping, steps: int) -> optax.Schedule | float:
  """'constant' or 'cosine' (to zero at the end), each with linear warmup."""
  lr, warmup = float(opt_cfg["lr"]), int(opt_cfg.get("warmup_steps", 0))
  kind = opt_cfg.get("schedule", "constant")
  if kind == "constant":
    if not warmup:
      return lr
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                [warmup])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
  raise ValueError(f"unknown schedule {kind!r}; pass make_tx for anything else")


def default_tx(trainable: PyTree, rules, opt_cfg: Mapping, steps: int,
               learning_rate: Any = None) -> tuple[optax.GradientTransformation, Any]:
  """The optimizer of a stage: `optim.make_optimizer` from the stage's `optimizer` fields,
  at `learning_rate` (an optax schedule) or else the `schedule`/`warmup_steps` fields'."""
  lr = make_schedule(opt_cfg, steps) if learning_rate is None else learning_rate
  tx = optim.make_optimizer(
      trainable, rules, name=opt_cfg["name"], learning_rate=lr,
      weight_decay=float(opt_cfg.get("weight_decay", 0.0)),
      coupled_decay=bool(opt_cfg.get("coupled_decay", True)),
      **dict(opt_cfg.get("hparams", {}) or {}))
  return tx, lr


@dataclasses.dataclass
class StageResult:
  state: dict                 # params (trainable), model_state, opt, step
  frozen: PyTree
  mesh: jax.sharding.Mesh
  state_shardings: dict
  frozen_shardings: PyTree
  meta: dict                  # meta of the final checkpoint

  @property
  def params(self) -> PyTree:
    """The full parameter tree (trainable merged with frozen)."""
    return optim.merge(self.state["params"], self.frozen)


# ============================================================== the stage runner

def make_shardings(trainable: PyTree, frozen: PyTree, model_state: PyTree,
                   tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                   rules: Sequence, min_size: int = 0) -> tuple[dict, PyTree]:
  """(state shardings, frozen shardings): params by the regex rules, optimizer state
  mirroring its params, mutable model state and the step replicated."""
  repl = shd.replicated(mesh)
  param_sh = shd.infer_shardings(trainable, mesh, rules, min_size)
  frozen_sh = shd.infer_shardings(frozen, mesh, rules, min_size)
  opt_sh = shd.mirror_shardings(jax.eval_shape(tx.init, trainable), trainable, param_sh, mesh)
  state_sh = dict(params=param_sh, model_state=jax.tree.map(lambda _: repl, model_state),
                  opt=opt_sh, step=repl)
  return state_sh, frozen_sh


def init_state(trainable: PyTree, model_state: PyTree, tx: optax.GradientTransformation,
               state_sh: dict) -> dict:
  """A step-0 state placed in its shardings (optimizer state created in place)."""
  params = shd.put(trainable, state_sh["params"])
  return dict(params=params, model_state=shd.put(model_state, state_sh["model_state"]),
              opt=jax.jit(tx.init, out_shardings=state_sh["opt"])(params),
              step=shd.put(np.zeros((), np.int32), state_sh["step"]))


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, state_sh: dict,
                   frozen_sh: PyTree, mesh: jax.sharding.Mesh, dtype: Any = jnp.float32):
  """`train_step` jitted over the mesh: state donated, batch split, rng replicated."""
  repl = shd.replicated(mesh)
  return jax.jit(functools.partial(train_step, loss_fn=loss_fn, tx=tx, dtype=dtype),
                 in_shardings=(state_sh, frozen_sh, shd.batch_sharding(mesh), repl),
                 out_shardings=(state_sh, repl), donate_argnames=("state",))


def _count(tree: PyTree) -> int:
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


class _SigtermFlag:
  """Sets a flag on SIGTERM (the loop saves and stops at the next step boundary)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption support
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.raised
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.raised))))


def run_stage(cfg: Mapping, *, workdir: str, stage: str, init: InitFn, loss_fn: LossFn,
              rules: Sequence, loader, make_tx: Optional[Callable] = None,
              frozen_source: str = "", mesh: Optional[jax.sharding.Mesh] = None,
              on_epoch_end: Optional[Callable[[int, dict, PyTree], Mapping]] = None
              ) -> StageResult:
  """Train one stage to completion (or resume it), returning its final state.

  `make_tx(trainable, rules, total_steps) -> (tx, learning_rate)` overrides the
  optimizer built from `cfg.optimizer`. `frozen_source` (a path or name) is
  recorded in checkpoint metadata. `on_epoch_end(epoch, state, frozen)` may
  return metrics to log (evaluation). Raises `Preempted` after saving on SIGTERM
  and `FloatingPointError` on a non-finite loss (nothing is saved past the last
  finite step).
  """
  defaults = stage_defaults()
  get = lambda k: cfg[k] if k in cfg else defaults[k]  # noqa: E731
  stage_dir = os.path.join(workdir, stage)
  is_main = jax.process_index() == 0

  # --- Mesh -----------------------------------------------------------------
  if mesh is None:
    mesh = shd.make_mesh([tuple(a) for a in get("mesh")] if get("mesh")
                         else shd.mesh_axes(int(get("fsdp") or 0)))
  logging.info("stage %s: mesh %s over %d devices, %d processes", stage, dict(mesh.shape),
               mesh.size, jax.process_count())

  # --- Model: init, split into trainable / frozen ---------------------------
  rng = jax.random.key(int(get("seed")))
  init_rng, step_rng = jax.random.split(rng)
  params, model_state = init(init_rng)
  model_state = model_state or {}
  trainable, frozen = optim.split(params, rules)
  del params

  # --- Duration and optimizer -----------------------------------------------
  n_steps = total_steps(loader, epochs=int(get("total_epochs") or 0),
                        steps=int(get("total_steps") or 0))
  opt_cfg = get("optimizer")
  if make_tx is None:
    tx, learning_rate = default_tx(trainable, rules, opt_cfg, n_steps)
  else:
    tx, learning_rate = make_tx(trainable, rules, n_steps)

  writer = metrics_lib.MetricWriter(stage_dir)
  table = optim.rule_table(optim.merge(trainable, frozen), rules, base_lr=float(opt_cfg["lr"]),
                           weight_decay=float(opt_cfg.get("weight_decay", 0.0)))
  counts = (f"parameters: {_count(trainable) + _count(frozen):,} total, "
            f"{_count(trainable):,} trainable, {_count(frozen):,} frozen; "
            f"model state: {_count(model_state):,}; steps: {n_steps}")
  writer.text("rules", table + "\n" + counts)

  # --- Shardings ------------------------------------------------------------
  fsdp_on = "fsdp" in mesh.axis_names
  rules_sh = [tuple(r) for r in get("sharding_rules")] if get("sharding_rules") \
      else shd.default_rules(fsdp_on)
  min_size = int(get("fsdp_min_size"))
  repl = shd.replicated(mesh)
  state_sh, frozen_sh = make_shardings(trainable, frozen, model_state, tx, mesh, rules_sh, min_size)
  ckpt_sh = dict(state=state_sh, rng=repl)
  logging.info("parameter shardings:\n  %s", "\n  ".join(
      shd.describe({"trainable": state_sh["params"], "frozen": frozen_sh})))

  # --- Initial state (possibly replaced by a checkpoint below) --------------
  frozen = shd.put(frozen, frozen_sh)
  state = init_state(trainable, model_state, tx, state_sh)
  rng_data = shd.put(np.asarray(jax.random.key_data(step_rng)), repl)
  frozen_ref = dict(source=frozen_source, fingerprint=ckpt_lib.fingerprint(frozen))

  # --- Resume: this stage's checkpoints > cfg.resume > init -----------------
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir, stage),
                             keep=int(get("keep_checkpoints")),
                             async_save=bool(get("async_checkpoints")))
  target = shd.abstract(dict(state=state, rng=rng_data), ckpt_sh)
  restored = ck.restore_latest(target)
  origin = f"checkpoint {ck.directory}"
  if restored is None and get("resume"):
    other = ckpt_lib.Checkpointer(get("resume"), async_save=False)
    restored = other.restore_latest(target)
    other.close()
    if restored is None:
      raise FileNotFoundError(f"cfg.resume={get('resume')!r} holds no usable checkpoint")
    origin = f"resume path {get('resume')}"
  epoch, batch_idx, meta = 0, 0, {}
  if restored is not None:
    tree, meta = restored
    state, rng_data = tree["state"], tree["rng"]
    epoch, batch_idx = int(meta["epoch"]), int(meta["batch"])
    logging.info("stage %s: resumed from %s at step %d (epoch %d, batch %d)", stage, origin,
                 meta["step"], epoch, batch_idx)
    saved_ref = meta.get("frozen", {})
    if saved_ref.get("fingerprint") not in (None, frozen_ref["fingerprint"]):
      logging.warning("stage %s: frozen weights differ from those the checkpoint was trained "
                      "with (saved source %r, now %r)", stage, saved_ref.get("source"),
                      frozen_source)
  else:
    logging.info("stage %s: starting from init", stage)
  step = int(jax.device_get(state["step"]))
  if meta.get("final"):
    logging.info("stage %s: already finished at step %d", stage, step)
    ck.close()
    writer.close()
    return StageResult(state, frozen, mesh, state_sh, frozen_sh, meta)

  # --- The jitted step --------------------------------------------------------
  dtype = precision.compute_dtype(get("precision"))
  step_fn = jit_train_step(loss_fn, tx, state_sh, frozen_sh, mesh, dtype)
  base_rng = jax.random.wrap_key_data(rng_data)

  # --- Loop -------------------------------------------------------------------
  log_every = max(1, int(get("log_every_steps")))
  ckpt_every = int(get("ckpt_every_steps") or 0)
  pending: list[tuple[int, dict]] = []
  progress = metrics_lib.Progress(n_steps, step, loader.batch_size, desc=stage,
                                  enabled=is_main and bool(get("progress")))

  def position_meta(final: bool = False) -> dict:
    return dict(stage=stage, epoch=epoch, batch=batch_idx, final=final, frozen=frozen_ref,
                total_steps=n_steps)

  def flush() -> None:
    """Fetch pending metrics, stop on a non-finite loss, log the means."""
    if not pending:
      return
    rows = jax.device_get([m for _, m in pending])
    for (s, _), row in zip(pending, rows):
      if not np.isfinite(row["loss"]):
        ck.wait()
        last = ck.latest_step()
        where = (f"the last good checkpoint (step {last}) in {ck.directory} is intact"
                 if last is not None else "no checkpoint was written for this stage")
        pending.clear()
        raise FloatingPointError(
            f"non-finite loss ({float(row['loss'])}) at step {s} of stage {stage!r}; stopping. "
            f"{where}. Lower the learning rate or check the inputs, then rerun to resume.")
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    last_step = pending[-1][0]
    if callable(learning_rate):
      means["lr"] = float(learning_rate(last_step - 1))
    else:
      means["lr"] = float(learning_rate)
    ips = progress.images_per_second(last_step)
    if math.isfinite(ips):
      means["images_per_s"] = ips
    writer.scalars(last_step, means)
    pending.clear()

  saved_at = [ck.latest_step() if ck.latest_step() == step else -1]

  def save(final: bool = False, wait: bool = False) -> None:
    flush()  # never write a checkpoint past a non-finite loss
    if saved_at[0] == step and final:  # a non-final save of this step exists: replace it
      ck.wait()
      ck.delete(step)
      saved_at[0] = -1
    if saved_at[0] != step:  # e.g. SIGTERM right after a periodic save
      ck.save(step, dict(state=state, rng=rng_data), position_meta(final), wait=wait)
      saved_at[0] = step
    elif wait:
      ck.wait()

  sigterm = _SigtermFlag()
  try:
    with sigterm, jax.set_mesh(mesh):
      while step < n_steps:
        n_in_epoch = epoch_steps(loader, epoch)
        if batch_idx >= n_in_epoch:  # an epoch with fewer batches than the saved position
          epoch, batch_idx = epoch + 1, 0
          continue
        for local in loader.iterate(epoch, batch_idx):
          batch = shd.global_batch(local, mesh)
          state, m = step_fn(state, frozen, batch, base_rng)
          step += 1
          batch_idx += 1
          if batch_idx == n_in_epoch:
            epoch, batch_idx = epoch + 1, 0
          pending.append((step, m))
          progress.update(step)
          if step % log_every == 0:
            flush()
          if ckpt_every and step % ckpt_every == 0 and step < n_steps:
            save()
          check_signal = jax.process_count() == 1 or step % log_every == 0
          if check_signal and step < n_steps and sigterm.any_process():
            save(wait=True)
            raise Preempted(f"SIGTERM: saved checkpoint at step {step} of stage {stage!r} in "
                            f"{ck.directory}; rerun the same command to resume")
          if step >= n_steps or batch_idx == 0:
            break
        if batch_idx == 0 and on_epoch_end is not None:
          extra = on_epoch_end(epoch - 1, state, frozen)
          if extra:
            writer.scalars(step, {f"eval/{k}": v for k, v in extra.items()})
      save(final=True, wait=True)
      meta = position_meta(final=True)
      if sigterm.raised:  # arrived during the last step: the stage is done, stop the pipeline
        raise Preempted(f"SIGTERM: stage {stage!r} finished and saved at step {step}; rerun the "
                        f"same command to continue with the next stage")
  finally:
    progress.close()
    pending.clear()
    try:
      ck.close()
    finally:
      writer.close()
  logging.info("stage %s: finished at step %d", stage, step)
  return StageResult(state, frozen, mesh, state_sh, frozen_sh, meta)
