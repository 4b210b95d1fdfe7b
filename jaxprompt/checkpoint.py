"""Orbax checkpoints of a training stage, with integrity checks and fallback.

One `Checkpointer` per stage directory (`<workdir>/<stage>/checkpoints/<step>/`).
Each step holds two items:

* `state`: the trainer state pytree (trainable params, mutable model state,
  optimizer state, step, rng key data), written by every process for its own
  shards and restored straight into target shardings (an abstract tree of
  `jax.ShapeDtypeStruct(..., sharding=...)`);
* `meta`: JSON with the data position (`epoch`, `batch` = next batch to run), the
  stage name, a `final` flag, a fingerprint of every state leaf, and a reference
  to the frozen pretrained weights (source and fingerprint), which are never
  rewritten.

Orbax commits a step by renaming a temporary directory, so a run killed during a
save leaves the previous steps untouched. A step that fails to load, or whose
contents do not match the fingerprint stored at save time, is reported, moved to
`<stage>/corrupt_checkpoints/`, and the previous step is tried; a stage's final
checkpoint read by the next stage (`read_final`, `read_params`) goes through the
same report-and-quarantine path and names the stage to rerun.

A save that fails, synchronously or in Orbax's background thread, raises
`CheckpointSaveError` naming the folder at the next `save`, `check` or `wait`.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any


class CorruptCheckpointError(RuntimeError):
  """A checkpoint does not load or does not match its fingerprint."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the folder."""


# ------------------------------------------------------------------ fingerprints

def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """A position-weighted uint32 sum of the leaf's bits: exact, order-independent
  (integer adds), so every mesh layout gives the same value."""
  x = jnp.ravel(x)
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_ or size == 1:
    u = x.astype(jnp.uint8).astype(jnp.uint32)
  elif size == 2:
    u = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:  # 4 bytes, or 8 bytes which bitcast to a trailing pair of uint32
    u = jnp.ravel(lax.bitcast_convert_type(x, jnp.uint32))
  w = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(u * w, dtype=jnp.uint32)


def fingerprint(tree: PyTree) -> list[int]:
  """One uint32 per leaf, identical on every process."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return []
  mesh = next((x.sharding.mesh for x in leaves
               if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  return [int(v) for v in jax.device_get(_fingerprint_fn(mesh)(leaves))]


@functools.lru_cache(maxsize=None)
def _fingerprint_fn(mesh):
  # Replicated outputs so every process can read them; cached so saves do not recompile.
  out_sharding = NamedSharding(mesh, P()) if mesh is not None else None
  return jax.jit(lambda ls: [_leaf_fingerprint(x) for x in ls], out_shardings=out_sharding)


# ------------------------------------------------------------------ the manager

class Checkpointer:
  """Save/restore a stage's state; `keep` most recent steps are kept."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    """`read_only` (for readers such as `read_final`) leaves unfinished saves of a running
    process alone instead of cleaning them up."""
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self.keep = keep
    self.async_save = async_save
    self.failed = False
    self._pending_step: Optional[int] = None
    self._open()

  def _open(self) -> None:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, create=not self.read_only,
        enable_async_checkpointing=self.async_save, cleanup_tmp_directories=not self.read_only)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any], *, wait: bool = False) -> None:
    """Write `state` and `meta` (plus the state's fingerprint) as `step`."""
    self.wait()  # Orbax waits for the previous save anyway; this reports its failure as its own
    meta = dict(meta, step=int(step), fingerprint=fingerprint(state), time=time.time())
    self._pending_step = int(step)
    try:
      self._mngr.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e
    if wait:
      self.wait()

  def _save_failed(self, e: BaseException) -> CheckpointSaveError:
    self.failed = True
    step = self._pending_step
    return CheckpointSaveError(
        f"could not write checkpoint{'' if step is None else f' step {step}'} to "
        f"{self.directory} ({type(e).__name__}: {_short(e)}); check that the folder exists, is "
        f"writable and has space. Earlier checkpoints there are intact: rerun the same command "
        f"to resume from the latest one")

  def check(self) -> None:
    """Raise `CheckpointSaveError` if a background save has failed (does not wait for one
    still running)."""
    try:
      self._mngr.check_for_errors()
      if self._pending_step is not None and not self._mngr.is_saving_in_progress():
        # Orbax keeps the error of a finished save for `wait_until_finished`, which
        # returns at once now that nothing runs.
        self._mngr.wait_until_finished()
        self._pending_step = None
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def delete(self, step: int) -> None:
    self._mngr.delete(int(step))

  def wait(self) -> None:
    try:
      self._mngr.wait_until_finished()
      self._pending_step = None
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._mngr.close()
      except Exception:  # pylint: disable=broad-except
        if not self.failed:  # after a failed save, the manager's own re-raise adds nothing
          raise

  def saved_keys(self, step: int) -> set[str]:
    """The top-level keys of the state tree saved at `step` (empty if unreadable)."""
    try:
      tree = self._mngr.item_metadata(step)["state"]
      tree = getattr(tree, "tree", tree)
      return set(tree) if isinstance(tree, Mapping) else set()
    except Exception:  # pylint: disable=broad-except  # restore_latest reports bad steps
      return set()

  def read_meta(self, step: int) -> dict:
    return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore(self, step: int, target: PyTree) -> tuple[PyTree, dict]:
    """Restore `step` into `target` (abstract arrays with shardings) and verify it."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state, meta = out["state"], dict(out["meta"])
    expected = meta.get("fingerprint")
    if expected is not None and fingerprint(state) != list(expected):
      bad = [n for n, a, b in zip(_names(state), fingerprint(state), expected) if a != b]
      raise CorruptCheckpointError(f"contents do not match the fingerprint saved with them "
                                   f"(leaves {bad[:5]}{'...' if len(bad) > 5 else ''})")
    return state, meta

  def restore_latest(self, target: PyTree) -> Optional[tuple[PyTree, dict]]:
    """The newest step that loads and verifies; bad steps are reported and set aside."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, target)
      except Exception as e:  # any read/parse/verify failure means "not usable"
        moved = self._quarantine(step)
        logging.error("checkpoint %s/%d is corrupt or unreadable (%s: %s); moved it to %s and "
                      "falling back to the previous checkpoint", self.directory, step,
                      type(e).__name__, _short(e), moved)
    return None

  def _quarantine(self, step: int) -> str:
    dest = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints",
                        f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    _sync("quarantine")
    # The manager caches its step list; reopen it so the moved step is forgotten.
    self._mngr.close()
    self._open()
    return dest


def _names(tree: PyTree) -> list[str]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(p) for p, _ in flat]


def _short(e: Exception, n: int = 300) -> str:
  s = str(e).replace("\n", " ")
  return s if len(s) <= n else s[:n] + "..."


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------ stage hand-off

def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "checkpoints")


def final_step(directory: str) -> Optional[int]:
  """The step of the stage's final checkpoint, or None if the stage has not finished."""
  if not os.path.isdir(directory):
    return None
  ck = Checkpointer(directory, async_save=False, read_only=True)
  try:
    for step in reversed(ck.all_steps()):
      try:
        if ck.read_meta(step).get("final"):
          return step
      except Exception:
        continue
    return None
  finally:
    ck.close()


def read_final(workdir: str, stage: str, shardings: Optional[PyTree] = None
               ) -> tuple[PyTree, dict]:
  """A finished stage's final checkpoint tree (`{'state': {'params', 'model_state',
  'opt', 'step'}, 'rng'}`) and meta.

  Without `shardings` the arrays come back as host numpy arrays; with a
  shardings tree (matching the state's structure) they are placed there. A final
  checkpoint that does not load is moved to `corrupt_checkpoints/` and
  `CorruptCheckpointError` names the stage to rerun.
  """
  directory = checkpoint_dir(workdir, stage)
  step = final_step(directory)
  if step is None:
    raise FileNotFoundError(f"stage {stage!r} has no final checkpoint under {directory}; "
                            f"run that stage first (launch.py --stage={stage})")
  ck = Checkpointer(directory, async_save=False, read_only=True)
  try:
    try:
      meta_tree = ck._mngr.item_metadata(step)["state"]
      tree = getattr(meta_tree, "tree", meta_tree)
      device = jax.local_devices()[0]
      if shardings is None:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
            tuple(m.shape), m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), tree)
      else:
        target = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s),
            tree, shardings)
      state, meta = ck.restore(step, target)
    except Exception as e:  # any read/parse/verify failure: report, set aside, say what to do
      moved = ck._quarantine(step)
      logging.error("checkpoint %s/%d (final of stage %s) is corrupt or unreadable (%s: %s); "
                    "moved it to %s", directory, step, stage, type(e).__name__, _short(e), moved)
      raise CorruptCheckpointError(
          f"the final checkpoint of stage {stage!r} ({directory}/{step}) is corrupt or "
          f"unreadable ({type(e).__name__}: {_short(e, 160)}); it was moved to {moved}. Rerun "
          f"stage {stage!r} (launch.py ... --stage={stage}, or the whole pipeline): it resumes "
          f"from its previous checkpoint and writes a new final one") from e
  finally:
    ck.close()
  if shardings is None:
    state = jax.device_get(state)
  return state, meta


def read_params(workdir: str, stage: str) -> tuple[dict, dict]:
  """`(trainable_params, model_state)` of a finished stage, as numpy; merge them
  with that stage's frozen weights (`jaxprompt.optim.merge`) to get its full model."""
  tree, _ = read_final(workdir, stage)
  return tree["state"]["params"], tree["state"].get("model_state", {})
