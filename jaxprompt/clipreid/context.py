"""The run context of a CLIP-ReID run: dataset, CLIP tower, mesh and jitted embedders, loaded once."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxprompt import metrics as metrics_lib
from jaxprompt import precision
from jaxprompt import sharding as shd
from jaxprompt.clipreid import data as reid_data
from jaxprompt.clipreid import model as clipreid
from jaxprompt.clipreid import transforms
from jaxprompt.clipreid.config import _dataset_key, _is_vit
from jaxprompt.clipreid.released import load_released
from jaxprompt.convert.openai_clip import load_clip
from jaxprompt.data.loader import Loader, PaddedSequentialSampler
from jaxprompt.models.clip import CLIP, CLIPConfig


def save_cache(path: str, **arrays: np.ndarray) -> None:
  """Atomic `.npz` of cached features, from process 0 (a killed run never leaves half a file)."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def tiny_clip_config(config) -> CLIPConfig:
  """The small CLIP of `model.tiny`, built for `data.size` and the stride options."""
  t = config.model.tiny
  vit = t.vision == "vit"
  if vit != _is_vit(config):
    raise ValueError(f"model.tiny.vision={t.vision!r} does not match "
                     f"backbone={config.backbone!r}")
  base = CLIPConfig(
      embed_dim=t.embed_dim, vision="vit" if vit else "resnet", vision_width=t.width,
      vision_layers=t.layers if vit else tuple(t.rn_layers),
      vision_heads=t.heads if vit else max(1, 32 * t.width // 64),
      patch_size=t.patch_size if vit else 32, pretrained_grid=4, context_length=77,
      vocab_size=49408, text_width=t.text_width, text_heads=t.text_heads,
      text_layers=t.text_layers)
  if vit:
    return base.with_input(tuple(config.data.size), patch_stride=int(config.model.stride))
  return base.with_input(tuple(config.data.size), last_stride=int(config.model.last_stride))


def load_backbone(config) -> tuple[CLIP, dict]:
  """(CLIP model, host variables) from `model.weights` or `model.tiny_random`."""
  dtype = precision.compute_dtype(config.precision)
  if config.model.weights:
    kw = (dict(patch_stride=int(config.model.stride)) if _is_vit(config)
          else dict(last_stride=int(config.model.last_stride)))
    model, variables = load_clip(config.model.weights, image_size=tuple(config.data.size),
                                 dtype=dtype, field="model.weights", **kw)
    if (model.config.vision == "vit") != _is_vit(config):
      raise ValueError(f"{config.model.weights} holds a {model.config.vision} image tower "
                       f"but backbone={config.backbone!r}")
    return model, jax.device_get(variables)
  cfg = tiny_clip_config(config)
  model = CLIP(cfg, dtype=dtype)
  h, w = cfg.input_size

  @jax.jit
  def init(rng):
    return model.init(rng, jnp.zeros((1, h, w, 3)), jnp.zeros((1, 77), jnp.int32))

  variables = jax.device_get(init(jax.random.key(int(config.model.tiny.seed))))
  return model, {k: dict(v) for k, v in variables.items()}


@dataclasses.dataclass
class SIESpec:
  """How camera/view indices become SIE rows (static; shapes come from the data).

  An index outside the table is an error (`check_indices`, on the host, before any
  embedding), as the reference's torch indexing fails on it. Only `clamp=True`
  (`model.sie_clamp`) maps such an index to the last row instead.
  """
  camera: bool
  view: bool
  coefficient: float
  num_views: int
  clamp: bool = False

  @property
  def on(self) -> bool:
    return self.camera or self.view

  def indices(self, camid, viewid):
    return clipreid.sie_index(camid, np.maximum(viewid, 0) if isinstance(viewid, np.ndarray)
                              else jnp.maximum(viewid, 0), self.num_views, self.camera,
                              self.view)

  def check_indices(self, records, rows: int, what: str) -> None:
    """Raise on the first record whose SIE row is outside a table of `rows` rows."""
    if not self.on or self.clamp or not records:
      return
    cams = np.asarray([r.camid for r in records], np.int64)
    views = np.asarray([r.viewid for r in records], np.int64)
    idx = self.indices(cams, views)
    bad = np.flatnonzero((idx < 0) | (idx >= rows))
    if bad.size:
      i = int(bad[0])
      raise ValueError(
          f"SIE index {int(idx[i])} (camera {int(cams[i])}, view {int(views[i])}) of "
          f"{records[i].path} in {what} is out of range for the SIE table of {rows} rows "
          f"(model.sie_camera={self.camera}, model.sie_view={self.view}, "
          f"{self.num_views} views); {int(bad.size)} of {len(records)} images are out of range")

  def vectors(self, table, camid, viewid):
    if not self.on or table is None:
      return None
    idx = self.indices(camid, viewid)
    if self.clamp:
      # Only where the recipe cannot index its own table (VehicleID SIE + OLP: every gallery
      # image has camera 1, the table one row): the last row, i.e. a constant offset.
      idx = jnp.clip(idx, 0, table.shape[0] - 1)
    return self.coefficient * table[idx]


# (dataset, root) pairs whose statistics table this process has shown on the console.
_SUMMARIES_SHOWN: set = set()


class Context:
  """Lazily loaded pieces shared by the stages of one run (dataset, CLIP, mesh, jits)."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self._dataset = None
    self._clip = None
    self.released_info: Optional[dict] = None
    self._embed = {}
    c = config.stage2
    self.mesh = shd.mesh_from_config(c)
    self.mean, self.std = transforms.norm_constants(config.backbone)
    self.size = tuple(int(s) for s in config.data.size)

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)

  @property
  def dataset(self) -> reid_data.ReIDDataset:
    if self._dataset is None:
      d = self.config.data
      if not d.root:
        raise ValueError("set data.root to the dataset folder")
      name = _dataset_key(d.name)
      kw = {}
      if name == "veri":
        kw = dict(keypoint_train=d.veri_keypoint_train or None,
                  keypoint_test=d.veri_keypoint_test or None)
      elif name == "vehicleid":
        kw = dict(test_size=int(d.vehicleid_test_size), seed=int(self.config.seed))
      self._dataset = reid_data.build_reid_dataset(name, d.root, **kw)
      summary = self._dataset.summary()
      logging.info("\n%s", summary)
      # Printed (to stdout, with the results) once: not when the log already reaches the
      # console, nor for a second run on the same data in this process (the default
      # job's evaluation before training).
      if (jax.process_index() == 0 and (name, d.root) not in _SUMMARIES_SHOWN
          and not metrics_lib.logs_reach_console()):
        print(summary, flush=True)
      _SUMMARIES_SHOWN.add((name, d.root))
    return self._dataset

  @property
  def clip(self) -> tuple[CLIP, dict]:
    if self._clip is None:
      if self.config.model.released_checkpoint:
        model, variables, self.released_info = load_released(self.config)
        self._clip = (model, variables)
      else:
        self._clip = load_backbone(self.config)
    return self._clip

  def clip_source(self) -> str:
    m = self.config.model
    return (m.released_checkpoint or m.weights
            or f"tiny_random(seed={m.tiny.seed})")

  def sie_spec(self, num_views: Optional[int] = None) -> SIESpec:
    m = self.config.model
    if num_views is None:
      # One row per view in view-only mode, as in camera x view mode.
      num_views = self.dataset.num_train_views if m.sie_view else 1
    return SIESpec(bool(m.sie_camera), bool(m.sie_view), float(m.sie_coe), int(num_views),
                   bool(m.sie_clamp))

  def decode(self, train: bool):
    return transforms.make_reid_decode(train, self.size, self.mean, self.std)

  def embed_fn(self, kind: str, sie: SIESpec, batch_size: int) -> BatchedApply:
    """Jitted batched image embedding: kind 'test' (eval embedding) or 'proj' (stage 1)."""
    key = (kind, dataclasses.astuple(sie), batch_size)
    if key not in self._embed:
      model, _ = self.clip

      def fn(v, batch):
        variables = {"params": {"img": v["img"]}}
        if v.get("batch_stats") is not None:
          variables["batch_stats"] = {"img": v["batch_stats"]}
        cv = sie.vectors(v.get("sie"), batch["camid"], batch["viewid"])
        feats = model.apply(variables, batch["image"], cv, False, method="image_features")
        return clipreid.test_embedding(feats) if kind == "test" else feats["proj"]

      self._embed[key] = BatchedApply(fn, self.mesh, batch_size,
                                             workers=int(self.config.data.workers))
    return self._embed[key]


def round_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size (and process count) >= batch_size."""
  m = int(np.lcm(mesh.size, jax.process_count()))
  return max(m, -(-int(batch_size) // m) * m)


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class BatchedApply:
  """`fn(variables, batch) -> (B, ...)` jitted once over `mesh`; variables replicated.

  Call with a variables tree, records and a `decode(record, rng)`; returns the stacked
  outputs for the records, in order, as a host numpy array.
  """

  def __init__(self, fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
               mesh: jax.sharding.Mesh, batch_size: int, workers: int = 0):
    self.mesh = mesh
    self.batch_size = round_batch(batch_size, mesh)
    self.workers = int(workers)
    self._repl = shd.replicated(mesh)
    self._fn = jax.jit(fn, in_shardings=(self._repl, shd.batch_sharding(mesh)),
                       out_shardings=shd.batch_sharding(mesh))

  def place(self, variables: Any) -> Any:
    """Put a host variables tree on the mesh once (reuse it across calls)."""
    return shd.put(variables, jax.tree.map(lambda _: self._repl, variables))

  def __call__(self, variables: Any, records: Sequence[Any],
               decode: Callable[[Any, np.random.Generator], dict], desc: str = "") -> np.ndarray:
    n = len(records)
    if n == 0:
      raise ValueError("no records to run the model on")
    loader = Loader(records, decode, PaddedSequentialSampler(n, self.batch_size), self.batch_size,
                    seed=0, workers=self.workers)
    outs = []
    with jax.set_mesh(self.mesh):
      for local in metrics_lib.progress(loader.iterate(0), total=loader.steps_per_epoch(0),
                                        desc=desc or f"embedding {n} images"):
        outs.append(_to_host(self._fn(variables, shd.global_batch(local, self.mesh))))
    return np.concatenate(outs)[:n]
