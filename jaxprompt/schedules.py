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

import math
from typing import Any, Callable, Sequence

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


def per_epoch(epoch_fn: EpochFn, steps_per_epoch: int, *, first_epoch: int = 1,
              num_epochs: int | None = None) -> Callable[[Any], Any]:
  """optax schedule: lr at step s = epoch_fn(first_epoch + s // steps_per_epoch).

  With `num_epochs`, epoch_fn is evaluated once per epoch in Python into a table (so it may be
  any Python function); steps past the table keep the last epoch's value.
  """
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
