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

`run_stage` reads in three named steps: `_Stage.restore` (mesh, init and split,
optimizer, shardings, then this stage's checkpoints > `cfg.resume` > `init`),
`_Stage.train` (the jitted step, metrics, periodic checkpoints, SIGTERM) and
`_Stage.save` (every write goes through it, and only after the state it writes
was checked finite). The final checkpoint is what the next stage reads with
`jaxprompt.checkpoint.read_params`.

A stage whose `init` reads the previous stage can pass `resume_init`: the same
tree without reading it (placeholders of the right shapes for the leaves named
by `carry`). When the stage has checkpoints of its own, `run_stage` calls
`resume_init` instead of `init` and restores the `carry` leaves (small frozen
leaves such as a previous stage's prompts) from its own checkpoint, so a
damaged earlier stage does not stop a later stage from resuming.

The state is a plain dict `{'params', 'model_state', 'opt', 'step'}`; frozen
weights travel separately and are never donated or checkpointed (but for the `carry`
leaves).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

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
from jaxprompt.data.loader import prefetch_to_device

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

  The metrics hold `loss`, `grad_norm`, `param_norm` (of the updated params), the
  loss function's own metrics and `finite`: whether the updated state is finite.

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
  grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
  metrics.update(loss=loss, grad_norm=grad_norm, param_norm=param_norm)
  # Whether the *updated* state is usable: the loss was computed before the update, so
  # an overflowing update shows only in the new parameters (their norm overflows first).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
  for x in jax.tree.leaves(model_state):
    if jnp.issubdtype(x.dtype, jnp.floating):
      finite &= jnp.all(jnp.isfinite(x))
  metrics["finite"] = finite
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
  c.label = ""                # the stage's name on the console (default: the stage's own)
  c.prefetch = 2              # batches put on the devices ahead of the running step (0: none)
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


def stream_batches(loader, epoch: int, batch: int, steps: int) -> Iterator[Any]:
  """`steps` batches of `loader` from position (epoch, batch) on, across epoch boundaries.

  An epoch with fewer batches than `batch` (a resumed position past its end) is skipped.
  """
  left = int(steps)
  while left > 0:
    n = epoch_steps(loader, epoch)
    if batch < n:
      for item in loader.iterate(epoch, batch):
        yield item
        left -= 1
        if left == 0:
          return
    epoch, batch = epoch + 1, 0


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
  timing: dict = dataclasses.field(default_factory=dict)  # steps, seconds, images_per_s

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


def _duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class _Stage:
  """One stage's run in named steps: `restore`, `train`, `save` (see `run_stage`)."""

  def __init__(self, cfg: Mapping, *, workdir: str, stage: str, loss_fn: LossFn, rules: Sequence,
               loader, make_tx: Optional[Callable], frozen_source: str,
               mesh: Optional[jax.sharding.Mesh], on_epoch_end: Optional[Callable],
               carry: Sequence[str]):
    defaults = stage_defaults()
    self.get = lambda k: cfg[k] if k in cfg else defaults[k]  # noqa: E731
    self.stage, self.workdir, self.loss_fn, self.rules = stage, workdir, loss_fn, list(rules)
    self.label = str(self.get("label") or stage)  # the console's name for the stage
    self.loader, self.make_tx, self.frozen_source = loader, make_tx, frozen_source
    self.mesh, self.on_epoch_end = mesh, on_epoch_end
    # Frozen leaves saved with the stage's checkpoints (see `resume_init`).
    self.carry_rules = [(rx, optim.Rule()) for rx in carry] + [(".*", optim.FREEZE)]
    self.carry = bool(carry)
    self.carry_saved = False
    self.is_main = jax.process_index() == 0
    self.t_start = time.perf_counter()
    self.ck = self.writer = self.progress = None
    self.pending: list[tuple[int, dict]] = []
    self.epoch = self.batch_idx = self.step = 0
    self.saved_at = -1
    self.meta: dict = {}
    self.last_means: dict = {}
    self.last_eval: dict = {}
    self.timing: dict = {}

  # ------------------------------------------------------------ restore

  def restore(self, init: InitFn, resume_init: Optional[InitFn]) -> None:
    """Build the stage and its state: this stage's checkpoints > `cfg.resume` > `init`."""
    get, stage = self.get, self.stage
    if self.mesh is None:
      self.mesh = shd.mesh_from_config({"mesh": get("mesh"), "fsdp": get("fsdp")})
    logging.info("stage %s: mesh %s over %d devices, %d processes", stage, dict(self.mesh.shape),
                 self.mesh.size, jax.process_count())
    init_rng, step_rng = jax.random.split(jax.random.key(int(get("seed"))))
    self.step_key = np.asarray(jax.random.key_data(step_rng))
    self.writer = metrics_lib.MetricWriter(os.path.join(self.workdir, stage))
    self.ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(self.workdir, stage),
                                    keep=int(get("keep_checkpoints")),
                                    async_save=bool(get("async_checkpoints")))
    own = bool(self.ck.all_steps())
    # Checkpoints written before the stage carried leaves hold none: restore those without.
    self.carry_saved = self.carry and (
        not own or "carried" in self.ck.saved_keys(self.ck.latest_step()))
    lazy = own and resume_init is not None and self.carry_saved  # the previous stage is not read
    self._build(*(resume_init if lazy else init)(init_rng))
    restored, origin = None, f"checkpoint {self.ck.directory}"
    if own:
      restored = self.ck.restore_latest(self._abstract_saved())
    if restored is None and lazy:  # none of this stage's checkpoints is usable
      self._build(*init(init_rng))
    if restored is None and get("resume"):
      other = ckpt_lib.Checkpointer(get("resume"), async_save=False)
      try:
        restored = other.restore_latest(self._abstract_saved())
      finally:
        other.close()
      if restored is None:
        raise FileNotFoundError(f"{stage}.resume={get('resume')!r} holds no usable checkpoint")
      origin = f"resume path {get('resume')}"
    self._apply(restored, origin)

  def _build(self, params: PyTree, model_state: PyTree) -> None:
    """Split, optimizer, shardings and a step-0 state placed on the mesh."""
    get, mesh = self.get, self.mesh
    model_state = model_state or {}
    trainable, frozen = optim.split(params, self.rules)
    del params
    self.n_steps = total_steps(self.loader, epochs=int(get("total_epochs") or 0),
                               steps=int(get("total_steps") or 0))
    opt_cfg = get("optimizer")
    if self.make_tx is None:
      self.tx, self.learning_rate = default_tx(trainable, self.rules, opt_cfg, self.n_steps)
    else:
      self.tx, self.learning_rate = self.make_tx(trainable, self.rules, self.n_steps)
    table = optim.rule_table(optim.merge(trainable, frozen), self.rules,
                             base_lr=float(opt_cfg["lr"]),
                             weight_decay=float(opt_cfg.get("weight_decay", 0.0)))
    counts = (f"parameters: {_count(trainable) + _count(frozen):,} total, "
              f"{_count(trainable):,} trainable, {_count(frozen):,} frozen; "
              f"model state: {_count(model_state):,}; steps: {self.n_steps}")
    self.writer.text("rules", table + "\n" + counts)
    rules_sh = [tuple(r) for r in get("sharding_rules")] if get("sharding_rules") \
        else shd.default_rules("fsdp" in mesh.axis_names)
    self.state_sh, self.frozen_sh = make_shardings(trainable, frozen, model_state, self.tx, mesh,
                                                   rules_sh, int(get("fsdp_min_size")))
    logging.info("parameter shardings:\n  %s", "\n  ".join(
        shd.describe({"trainable": self.state_sh["params"], "frozen": self.frozen_sh})))
    self.frozen = shd.put(frozen, self.frozen_sh)
    self.state = init_state(trainable, model_state, self.tx, self.state_sh)
    self.rng_data = shd.put(self.step_key, shd.replicated(mesh))

  def _saved(self) -> dict:
    """The tree a checkpoint holds: the state, the rng and the carried frozen leaves."""
    tree = dict(state=self.state, rng=self.rng_data)
    if self.carry:
      tree["carried"] = optim.split(self.frozen, self.carry_rules)[0]
    return tree

  def _abstract_saved(self) -> PyTree:
    sh = dict(state=self.state_sh, rng=shd.replicated(self.mesh))
    tree = self._saved()
    if self.carry and self.carry_saved:
      sh["carried"] = optim.split(self.frozen_sh, self.carry_rules)[0]
    else:
      tree.pop("carried", None)
    return shd.abstract(tree, sh)

  def _apply(self, restored: Optional[tuple[PyTree, dict]], origin: str) -> None:
    stage = self.stage
    if restored is None:
      logging.info("stage %s: starting from init", stage)
    else:
      tree, self.meta = restored
      self.state, self.rng_data = tree["state"], tree["rng"]
      if "carried" in tree:
        rest = optim.split(self.frozen, self.carry_rules)[1]
        self.frozen = optim.merge(tree["carried"], rest)
      self.epoch, self.batch_idx = int(self.meta["epoch"]), int(self.meta["batch"])
      if not self.meta.get("final"):
        metrics_lib.say(f"{stage}: resumed from {origin} at step {self.meta['step']} "
                        f"(epoch {self.epoch}, batch {self.batch_idx})")
    self.frozen_ref = dict(source=self.frozen_source,
                           fingerprint=ckpt_lib.fingerprint(self.frozen))
    saved_ref = self.meta.get("frozen", {})
    if saved_ref.get("fingerprint") not in (None, self.frozen_ref["fingerprint"]):
      logging.warning("stage %s: frozen weights differ from those the checkpoint was trained "
                      "with (saved source %r, now %r)", stage, saved_ref.get("source"),
                      self.frozen_source)
    self.step = int(jax.device_get(self.state["step"]))
    self.saved_at = self.step if self.ck.latest_step() == self.step else -1
    # Rows logged past this step by an interrupted run are replayed now: drop them.
    self.writer.drop_after(self.step)

  @property
  def finished(self) -> bool:
    return bool(self.meta.get("final"))

  # ------------------------------------------------------------ the loop

  def _wrap_epoch(self) -> None:
    """The position moves to the next epoch once this one's batches are all consumed (or
    when a resumed position lies past the end of a shorter epoch)."""
    while self.batch_idx >= epoch_steps(self.loader, self.epoch):
      self.epoch, self.batch_idx = self.epoch + 1, 0

  def train(self, sigterm: _SigtermFlag) -> None:
    """Steps until the stage's end, flushing metrics, saving and watching for SIGTERM."""
    get, stage, loader, mesh = self.get, self.stage, self.loader, self.mesh
    dtype = precision.compute_dtype(get("precision"))
    step_fn = jit_train_step(self.loss_fn, self.tx, self.state_sh, self.frozen_sh, mesh, dtype)
    base_rng = jax.random.wrap_key_data(self.rng_data)
    log_every = max(1, int(get("log_every_steps")))
    ckpt_every = int(get("ckpt_every_steps") or 0)
    n_steps, first_step = self.n_steps, self.step
    self.progress = metrics_lib.Progress(n_steps, self.step, loader.batch_size, desc=self.label,
                                         enabled=self.is_main and bool(get("progress")))
    # One stream of batches from the current position to the stage's end, across epoch
    # boundaries: the next epoch's first batches are decoded and copied while the last
    # steps of this one run. Host -> device copies of the next batches overlap the running
    # step; the position saved in checkpoints counts consumed batches only, so prefetching
    # never skips one.
    if self.step < n_steps:
      self._wrap_epoch()
    batches = prefetch_to_device(
        stream_batches(loader, self.epoch, self.batch_idx, n_steps - self.step),
        int(get("prefetch") or 0), shd.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      try:
        for batch in batches:
          self.state, m = step_fn(self.state, self.frozen, batch, base_rng)
          self.step += 1
          self.batch_idx += 1
          self._wrap_epoch()
          self.pending.append((self.step, m))
          if self.step == first_step + 1:
            # Throughput is measured from the end of the compiled first step on.
            jax.block_until_ready(m)
            self.progress.start(self.step)
          if self.step % log_every == 0:
            self.flush()
          if ckpt_every and self.step % ckpt_every == 0 and self.step < n_steps:
            self.save()
          check_signal = jax.process_count() == 1 or self.step % log_every == 0
          if check_signal and self.step < n_steps and sigterm.any_process():
            self.save(wait=True)
            raise Preempted(f"SIGTERM: saved checkpoint at step {self.step} of stage {stage!r} "
                            f"in {self.ck.directory}; rerun the same command to resume")
          if self.batch_idx == 0 and self.on_epoch_end is not None:
            extra = self.on_epoch_end(self.epoch - 1, self.state, self.frozen)
            if extra:
              self.last_eval = {k: float(v) for k, v in extra.items()}
              self.writer.scalars(self.step, {f"eval/{k}": v for k, v in extra.items()})
          if self.step >= n_steps:
            break
      finally:
        batches.close()  # stops the decoding threads of an abandoned stream
    self.flush()
    self.timing = dict(steps=self.step - first_step,
                       seconds=time.perf_counter() - self.t_start,
                       images_per_s=self.progress.steady_images_per_second())

  def flush(self) -> None:
    """Fetch pending metrics (waiting for their steps), stop on a non-finite state, log."""
    self.ck.check()  # a failed asynchronous save stops the run here
    if not self.pending:
      return
    rows = jax.device_get([m for _, m in self.pending])
    for (s, _), row in zip(self.pending, rows):
      if not (bool(row.get("finite", True)) and np.isfinite(row["loss"])):
        raise self._blown_up(s, row)
    keys = [k for k in rows[0] if k != "finite"]
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    last_step = self.pending[-1][0]
    lr = self.learning_rate
    means["lr"] = float(lr(last_step - 1)) if callable(lr) else float(lr)
    ips = self.progress.done(last_step, loss=means.get("loss"))
    if math.isfinite(ips):
      means["images_per_s"] = ips
    self.writer.scalars(last_step, means)
    self.last_means = means
    self.pending.clear()

  def _blown_up(self, step: int, row: Mapping) -> FloatingPointError:
    self.pending.clear()
    self.ck.wait()
    last = self.ck.latest_step()
    where = (f"The last good checkpoint (step {last}) in {self.ck.directory} is intact"
             if last is not None else f"No checkpoint of stage {self.stage!r} was written")
    if not np.isfinite(row["loss"]):
      what = f"non-finite loss ({float(row['loss'])}) at step {step} of stage {self.stage!r}"
    else:
      norms = ", ".join(f"{k}={float(row[k]):.4g}" for k in ("loss", "grad_norm", "param_norm")
                        if k in row)
      what = (f"non-finite state after the update of step {step} of stage {self.stage!r} "
              f"({norms})")
    return FloatingPointError(
        f"{what}; stopping without saving it. {where}. Lower the "
        f"learning rate or check the inputs, then rerun to resume.")

  # ------------------------------------------------------------ saving

  def _position_meta(self, final: bool) -> dict:
    return dict(stage=self.stage, epoch=self.epoch, batch=self.batch_idx, final=final,
                frozen=self.frozen_ref, total_steps=self.n_steps)

  def save(self, final: bool = False, wait: bool = False) -> None:
    """Checkpoint the current step: only after its state was fetched and found finite."""
    self.flush()
    if self.saved_at == self.step and final:  # a non-final save of this step: replace it
      self.ck.wait()
      self.ck.delete(self.step)
      self.saved_at = -1
    if self.saved_at != self.step:  # e.g. SIGTERM right after a periodic save
      self.ck.save(self.step, self._saved(), self._position_meta(final), wait=wait)
      self.saved_at = self.step
    elif wait:
      self.ck.wait()
    if final:
      self.meta = self._position_meta(final=True)

  def report(self) -> None:
    """The stage's one-line summary on the console."""
    if not self.timing:
      metrics_lib.say(f"{self.label}: already finished at step {self.step} "
                      f"({self.ck.directory})")
      return
    parts = [f"{self.label}: {self.timing['steps']} steps in {_duration(self.timing['seconds'])}"]
    ips = self.timing["images_per_s"]
    if math.isfinite(ips):
      parts.append(f"{ips:.1f} images/s (steady state, compilation excluded)")
    if "loss" in self.last_means:
      parts.append(f"loss {self.last_means['loss']:.4g}")
    parts += [f"{k} {v:.4g}" for k, v in self.last_eval.items()]
    metrics_lib.say(", ".join(parts))

  def close(self, failing: bool) -> None:
    if self.progress is not None:
      self.progress.close()
    self.pending.clear()
    try:
      if self.ck is not None:
        self.ck.close()
    except Exception:  # pylint: disable=broad-except
      if not failing:
        raise
      logging.exception("stage %s: closing the checkpointer after an error", self.stage)
    finally:
      if self.writer is not None:
        self.writer.close()

  def result(self) -> StageResult:
    return StageResult(self.state, self.frozen, self.mesh, self.state_sh, self.frozen_sh,
                       self.meta, self.timing)


def run_stage(cfg: Mapping, *, workdir: str, stage: str, init: InitFn, loss_fn: LossFn,
              rules: Sequence, loader, make_tx: Optional[Callable] = None,
              frozen_source: str = "", mesh: Optional[jax.sharding.Mesh] = None,
              on_epoch_end: Optional[Callable[[int, dict, PyTree], Mapping]] = None,
              resume_init: Optional[InitFn] = None, carry: Sequence[str] = ()
              ) -> StageResult:
  """Train one stage to completion (or resume it), returning its final state.

  `make_tx(trainable, rules, total_steps) -> (tx, learning_rate)` overrides the
  optimizer built from `cfg.optimizer`. `frozen_source` (a path or name) is
  recorded in checkpoint metadata. `on_epoch_end(epoch, state, frozen)` may
  return metrics to log (evaluation). `resume_init` and `carry` (regexes over
  frozen parameter names) let a stage resume from its own checkpoints without
  reading the previous stage (see the module docstring).

  Raises `Preempted` after saving on SIGTERM, `FloatingPointError` when a step's
  loss or updated state is not finite (nothing past the last finite step is
  saved, and the stage is never marked final on such a state), and
  `jaxprompt.checkpoint.CheckpointSaveError` when a checkpoint cannot be written.
  """
  run = _Stage(cfg, workdir=workdir, stage=stage, loss_fn=loss_fn, rules=rules, loader=loader,
               make_tx=make_tx, frozen_source=frozen_source, mesh=mesh,
               on_epoch_end=on_epoch_end, carry=carry)
  with _SigtermFlag() as sigterm:
    ok = False
    try:
      run.restore(init, resume_init)
      if not run.finished:
        run.train(sigterm)
        run.save(final=True, wait=True)
      ok = True
    finally:
      run.close(failing=not ok)
    if sigterm.raised:  # arrived after the last step or while restoring a finished stage
      raise Preempted(f"SIGTERM: stage {stage!r} finished and saved at step {run.step}; rerun "
                      f"the same command to continue with the next stage")
  run.report()
  logging.info("stage %s: finished at step %d", stage, run.step)
  return run.result()
