"""Per-epoch learning-rate schedules of the reference recipes, and their optax form.

The torch references step their schedulers once per epoch, so these are functions of the
epoch number; `per_epoch` turns one into an optax schedule of the optimizer step.

Epoch conventions (see the method specs):
  * CLIP-ReID calls `scheduler.step(epoch)` at the start of 1-based epoch e, so epoch e runs at
    `timm_cosine(e)` (stage 1) or `warmup_multistep(e)` (stage 2): `per_epoch(..., first_epoch=1)`.
  * LPT calls `scheduler.step(epoch + 1)` after 0-based epoch e, so epoch e runs at
    `lpt_cosine(e)`: `per_epoch(..., first_epoch=0)`.

Each function accepts a Python/NumPy epoch (returns a float) or a JAX array, traced or not
(returns a float32 array), so it can live inside a jitted step.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

EpochFn = Callable[[Any], Any]


def _xp(x: Any):
  return jnp if isinstance(x, jax.Array) else np


def _out(x: Any, traced: bool):
  return jnp.asarray(x, jnp.float32) if traced else float(x)


def timm_cosine(epoch: Any, *, base_lr: float, t_initial: int, lr_min: float = 0.0,
                warmup_t: int = 0, warmup_lr_init: float = 0.0, warmup_prefix: bool = False,
                cycle_limit: int = 1, cycle_decay: float = 1.0) -> Any:
  """timm `CosineLRScheduler._get_lr(t)` for cycle_mul 1, k_decay 1, no noise.

  Linear warmup from `warmup_lr_init` for t < warmup_t; then cosine from base_lr to lr_min
  over t_initial epochs on the absolute t (unless warmup_prefix), lr_min after the last cycle.
  """
  xp = _xp(epoch)
  t = xp.asarray(epoch, xp.float32 if xp is jnp else np.float64)
  if warmup_t > 0:
    warm = warmup_lr_init + t * ((base_lr - warmup_lr_init) / warmup_t)
  else:
    warm = t * 0.0
  tc = t - warmup_t if warmup_prefix else t
  cycle = xp.floor(tc / t_initial)
  t_curr = tc - t_initial * cycle
  lr_max = base_lr * xp.power(cycle_decay, cycle)
  # 0.5 * (1 + cos(pi t / T)) written as sin(pi (T - t) / 2T) ** 2: same value, but in float32
  # it keeps full relative precision near the end of a cycle, where the lr is tiny.
  cos = lr_min + (lr_max - lr_min) * xp.sin(0.5 * math.pi * (t_initial - t_curr) / t_initial) ** 2
  after = xp.where(cycle < cycle_limit, cos, lr_min)
  return _out(xp.where(t < warmup_t, warm, after), xp is jnp)


def warmup_multistep(epoch: Any, *, base_lr: float, milestones: Sequence[int], gamma: float = 0.1,
                     warmup_factor: float = 1.0 / 3, warmup_iters: int = 500,
                     warmup_method: str = "linear") -> Any:
  """WarmupMultiStepLR (reid-strong-baseline / CLIP-ReID) at `last_epoch = epoch`.

  lr = base_lr * w(e) * gamma ** #(milestones <= e), w linear (or constant) below warmup_iters.
  """
  if list(milestones) != sorted(milestones):
    raise ValueError(f"milestones must be increasing, got {milestones}")
  if warmup_method not in ("linear", "constant"):
    raise ValueError(f"warmup_method must be 'linear' or 'constant', got {warmup_method!r}")
  xp = _xp(epoch)
  e = xp.asarray(epoch, xp.float32 if xp is jnp else np.float64)
  if warmup_method == "linear" and warmup_iters > 0:
    alpha = e / warmup_iters
    w = warmup_factor * (1.0 - alpha) + alpha
  else:
    w = warmup_factor + 0.0 * e
  w = xp.where(e < warmup_iters, w, 1.0)
  n_passed = sum(xp.where(e >= m, 1.0, 0.0) for m in milestones) if milestones else 0.0 * e
  return _out(base_lr * w * xp.power(gamma, n_passed), xp is jnp)


def lpt_cosine(epoch: Any, *, base_lr: float, epochs: int, warmup_epochs: int = 1,
               warmup_lr_init: float = 1e-6) -> Any:
  """LPT: lr during 0-based epoch e (timm cosine, t_initial=epochs, lr_min 0, no prefix).

  Epoch 0 runs at warmup_lr_init (the value timm sets at construction); epoch e >= warmup_epochs
  runs at base_lr * 0.5 * (1 + cos(pi * e / epochs)).
  """
  return timm_cosine(epoch, base_lr=base_lr, t_initial=epochs, lr_min=0.0,
                     warmup_t=warmup_epochs, warmup_lr_init=warmup_lr_init)


def vpt_cosine(epoch: Any, *, base_lr: float, epochs: int, warmup_epochs: int) -> Any:
  """VPT's WarmupCosineSchedule per epoch (KMnP/vpt src/solver/lr_scheduler.py): e / W below
  W, then 0.5 (1 + cos(pi p)) with p = (e - W) / (E - W). Python epochs only."""
  e = float(epoch)
  if e < warmup_epochs:
    return base_lr * e / max(1, warmup_epochs)
  p = (e - warmup_epochs) / max(1, epochs - warmup_epochs)
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


# name -> (function, how the stage's epoch count is passed, the parameters it takes)
_BY_NAME = {
    "timm_cosine": (timm_cosine, "t_initial", ("lr_min", "warmup_t", "warmup_lr_init")),
    "warmup_multistep": (warmup_multistep, None,
                         ("milestones", "gamma", "warmup_factor", "warmup_iters")),
    "lpt_cosine": (lpt_cosine, "epochs", ("warmup_epochs", "warmup_lr_init")),
    "vpt_cosine": (vpt_cosine, "epochs", ("warmup_epochs",)),
}


def by_name(name: str, *, base_lr: float, epochs: int, params: Mapping[str, Any]) -> EpochFn:
  """The per-epoch lr function `name` ('constant' or a key of `_BY_NAME`), its parameters
  read from `params` (only the ones it takes; a missing one is an error naming it)."""
  if name == "constant":
    return lambda e: base_lr
  if name not in _BY_NAME:
    raise ValueError(f"unknown schedule {name!r}; expected one of {['constant', *_BY_NAME]}")
  fn, epochs_kw, keys = _BY_NAME[name]
  missing = [k for k in keys if k not in params]
  if missing:
    raise ValueError(f"schedule {name!r} needs {missing} in its config")
  kw = {k: (list(params[k]) if k == "milestones" else params[k]) for k in keys}
  if epochs_kw:
    kw[epochs_kw] = int(epochs)
  return functools.partial(fn, base_lr=float(base_lr), **kw)


def per_epoch(epoch_fn: EpochFn, steps_per_epoch: Union[int, Callable[[int], int]], *,
              first_epoch: int = 1, num_epochs: int | None = None,
              total_steps: int | None = None) -> Callable[[Any], Any]:
  """optax schedule: a step of (0-based) epoch e runs at `epoch_fn(first_epoch + e)`.

  `steps_per_epoch` is a number, or a function of the 0-based epoch (a loader's
  `steps_per_epoch`, for samplers whose epochs differ in length, e.g. identity P x K): then
  `total_steps` says how far to tabulate, and the lr still switches exactly at epoch starts,
  as a per-epoch `scheduler.step()` does. With a number and `num_epochs`, epoch_fn is
  evaluated once per epoch in Python into a table (so it may be any Python function); steps
  past the table keep the last epoch's value. With neither, epoch_fn is traced.
  """
  if callable(steps_per_epoch):
    if total_steps is None:
      raise ValueError("per_epoch with a steps_per_epoch function needs total_steps")
    bounds, lrs, acc, e = [], [], 0, 0
    while acc < total_steps:
      n = int(steps_per_epoch(e))
      if n <= 0:
        raise ValueError(f"epoch {e} of the loader has no full batch")
      acc += n
      bounds.append(acc)
      lrs.append(float(epoch_fn(first_epoch + e)))
      e += 1
    bounds_a = jnp.asarray(bounds, jnp.int32)
    lrs_a = jnp.asarray(lrs, jnp.float32)

    def bounded_schedule(step):
      idx = jnp.searchsorted(bounds_a, jnp.asarray(step, jnp.int32), side="right")
      return lrs_a[jnp.clip(idx, 0, len(lrs) - 1)]

    return bounded_schedule
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  if num_epochs is None:
    def schedule(step):
      epoch = first_epoch + jnp.asarray(step, jnp.int32) // steps_per_epoch
      return jnp.asarray(epoch_fn(epoch), jnp.float32)
    return schedule

  table = np.asarray([float(epoch_fn(first_epoch + i)) for i in range(num_epochs)], np.float32)

  def table_schedule(step):
    idx = jnp.asarray(step, jnp.int32) // steps_per_epoch
    return jnp.asarray(table)[jnp.clip(idx, 0, num_epochs - 1)]

  return table_schedule
