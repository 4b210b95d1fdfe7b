"""Readers for the re-identification datasets used by CLIP-ReID, and for a user's own data.

Each reader returns a `ReIDDataset`: three lists of `ReIDRecord` (train, query, gallery),
the identity mapping shared by the classifier rows and the stage-1 identity tokens, and the
counts the model needs (identities, cameras, views). The parsing rules follow the reference
repository (Syliz517/CLIP-ReID, `datasets/*.py`); where we deviate, the docstring says so.

Directory layouts (`root` may be the parent folder, as in the reference, or the dataset
folder itself):

  market1501  <root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/*.jpg
  dukemtmc    <root>/dukemtmcreid/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}/*.jpg
  occ_duke    <root>/dukemtmcreid/Occluded_Duke/{bounding_box_train,query,bounding_box_test}/*.jpg
  msmt17      <root>/MSMT17/{train,test}/ + list_{train,val,query,gallery}.txt   (V1 layout)
  veri        <root>/VeRi/{image_train,image_query,image_test}/*.jpg
              + keypoint_train.txt, keypoint_test.txt (viewpoint labels; see `read_veri`)
  vehicleid   <root>/VehicleID_V1.0/image/*.jpg
              + train_test_split/{train_list.txt,test_list_800.txt,...}
  generic     see `read_generic`.

Records carry `viewid = -1` when a dataset has no viewpoint labels (all but VeRi, and a
generic dataset without a view column). The reference stores a constant there instead (0, or
1 for Occluded-Duke and VehicleID); a side-information table indexed by views must therefore
use `max(viewid, 0)`. `num_train_views` counts distinct train values as the reference does,
so it is 1 for those datasets.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

SPLITS = ("train", "query", "gallery")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


# ---------------------------------------------------------------------------------------------
# Records, identity mapping, dataset container


@dataclasses.dataclass(frozen=True)
class ReIDRecord:
  """One image: path, identity label, 0-based camera, viewpoint (-1 if none), original id.

  `pid` is the training label (0..N-1) for train records and the original id for query and
  gallery records, as in the reference; `orig_pid` is always the id written in the data.
  """
  path: str
  pid: int
  camid: int
  viewid: int = -1
  orig_pid: int = -1


@dataclasses.dataclass(frozen=True)
class IdentityMap:
  """Bijection between original train identities and labels 0..N-1 (label i = orig_ids[i]).

  The same object indexes the classifier rows and the stage-1 identity tokens, so save it
  with the stage-1 checkpoint and compare it when stage 2 loads one.
  """
  orig_ids: tuple[int, ...]
  _index: dict = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    index = {int(p): i for i, p in enumerate(self.orig_ids)}
    if len(index) != len(self.orig_ids):
      raise ValueError("IdentityMap: original ids must be unique")
    object.__setattr__(self, "orig_ids", tuple(int(p) for p in self.orig_ids))
    object.__setattr__(self, "_index", index)

  @classmethod
  def from_ids(cls, ids: Iterable[int]) -> "IdentityMap":
    """Labels in sorted order of the original ids."""
    return cls(tuple(sorted(set(int(i) for i in ids))))

  @property
  def num_ids(self) -> int:
    return len(self.orig_ids)

  def __len__(self) -> int:
    return len(self.orig_ids)

  def label(self, orig_pid: int) -> int:
    try:
      return self._index[int(orig_pid)]
    except KeyError:
      raise KeyError(f"identity {orig_pid} is not one of the {self.num_ids} training "
                     "identities") from None

  def orig(self, label: int) -> int:
    return self.orig_ids[label]

  def to_dict(self) -> dict[str, Any]:
    return {"orig_ids": list(self.orig_ids)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "IdentityMap":
    return cls(tuple(d["orig_ids"]))

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, s: str) -> "IdentityMap":
    return cls.from_dict(json.loads(s))


def _split_stats(records: Sequence[ReIDRecord]) -> tuple[int, int, int, int]:
  """(ids, images, cameras, views), counted as distinct values like the reference."""
  return (len({r.pid for r in records}), len(records), len({r.camid for r in records}),
          len({r.viewid for r in records}))


@dataclasses.dataclass
class ReIDDataset:
  """Train/query/gallery records plus the counts that size the model."""
  name: str
  train: list[ReIDRecord]
  query: list[ReIDRecord]
  gallery: list[ReIDRecord]
  id_map: IdentityMap
  has_views: bool = False
  # Images skipped while reading, per split (e.g. VeRi images without a viewpoint label).
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)
  root: str = ""

  @property
  def num_train_pids(self) -> int:
    return self.id_map.num_ids

  @property
  def num_train_cams(self) -> int:
    return _split_stats(self.train)[2]

  @property
  def num_train_views(self) -> int:
    return _split_stats(self.train)[3]

  @property
  def num_query(self) -> int:
    return len(self.query)

  def train_pids(self) -> np.ndarray:
    """Train labels as an int array, the input of `IdentitySampler`."""
    return np.asarray([r.pid for r in self.train], dtype=np.int64)

  def summary(self) -> str:
    """A statistics table in the layout the reference prints."""
    lines = [f"Dataset {self.name} statistics:",
             "  ----------------------------------------",
             "  subset   | # ids | # images | # cameras",
             "  ----------------------------------------"]
    for split in SPLITS:
      ids, imgs, cams, _ = _split_stats(getattr(self, split))
      lines.append(f"  {split:<8s} | {ids:5d} | {imgs:8d} | {cams:9d}")
    lines.append("  ----------------------------------------")
    if self.has_views:
      lines.append(f"  train views: {self.num_train_views}")
    for split, n in self.dropped.items():
      if n:
        lines.append(f"  {split}: {n} images dropped (no viewpoint label)")
    return "\n".join(lines)


def check_num_ids(expected: int, dataset: Union[ReIDDataset, IdentityMap, int]) -> None:
  """Raise if a checkpoint's identity count differs from the dataset's train identities.

  Stage 2 uses this to refuse a stage-1 checkpoint trained on another set of identities:
  its identity tokens would index the wrong people (the reference fails silently,
  Syliz517/CLIP-ReID issue #14).
  """
  if isinstance(dataset, ReIDDataset):
    n = dataset.num_train_pids
    what = f"dataset {dataset.name!r} has {n} training identities"
  elif isinstance(dataset, IdentityMap):
    n, what = dataset.num_ids, f"identity map has {dataset.num_ids} identities"
  else:
    n, what = int(dataset), f"the data has {int(dataset)} training identities"
  if int(expected) != n:
    raise ValueError(
        f"identity count mismatch: the checkpoint has {int(expected)} identities but the {what}. "
        "Identity tokens and classifier rows are per training identity, so stage 1 must be "
        "rerun on this dataset before stage 2.")


# ---------------------------------------------------------------------------------------------
# Helpers


def _resolve_dir(name: str, root: str, candidates: Sequence[str], required: Sequence[str]) -> str:
  """First of root/<candidate> that holds every `required` entry; a clear error otherwise."""
  root = os.path.expanduser(str(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{name}: dataset root folder not found: {root}")
  tried = []
  for cand in candidates:
    base = os.path.join(root, cand) if cand else root
    missing = [r for r in required if not os.path.exists(os.path.join(base, r))]
    if not missing:
      return base
    tried.append(f"{base} (missing: {', '.join(os.path.join(base, m) for m in missing)})")
  raise FileNotFoundError(
      f"{name}: cannot find the dataset under {root}; expected {', '.join(required)} in one of: "
      + "; ".join(tried))


def _require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}: folder not found: {path}")


def _require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: file not found: {path}")


def _list_images(folder: str, exts: Sequence[str] = (".jpg",)) -> list[str]:
  """Sorted image files directly in `folder` (sorted so every run sees the same order)."""
  _require_dir(folder, "image folder")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(tuple(exts)))
  if not names:
    raise FileNotFoundError(f"no {'/'.join(exts)} images found in folder: {folder}")
  return [os.path.join(folder, n) for n in names]


def _parse_name(path: str, pattern: re.Pattern, example: str) -> tuple[int, int]:
  # Match the file name only: the reference searches the whole path, which can pick up
  # digits from a parent folder name.
  m = pattern.search(os.path.basename(path))
  if m is None:
    raise ValueError(f"cannot parse identity and camera from file name {path} "
                     f"(expected a name like {example!r})")
  return int(m.group(1)), int(m.group(2))


def _relabel(name: str, records: list[ReIDRecord]) -> tuple[list[ReIDRecord], IdentityMap]:
  """Map train pids to 0..N-1 in sorted order of the original ids.

  The reference enumerates a Python set of ints, which for these id ranges iterates in
  sorted order, so the mapping is the same.
  """
  id_map = IdentityMap.from_ids(r.orig_pid for r in records)
  if id_map.num_ids == 0:
    raise ValueError(f"{name}: the train split has no identities")
  return [dataclasses.replace(r, pid=id_map.label(r.orig_pid)) for r in records], id_map


# ---------------------------------------------------------------------------------------------
# Market-1501, DukeMTMC-reID, Occluded-Duke

_PERSON_RE = re.compile(r"([-\d]+)_c(\d)")


def _read_bbox_dir(folder: str, *, max_pid: Optional[int], num_cams: int, skip_junk: bool,
                   example: str) -> list[ReIDRecord]:
  out = []
  for path in _list_images(folder):
    pid, cam = _parse_name(path, _PERSON_RE, example)
    if skip_junk and pid == -1:
      continue  # junk detections
    if not 1 <= cam <= num_cams:
      raise ValueError(f"camera index {cam} outside 1..{num_cams} in file name {path}")
    if max_pid is not None and not 0 <= pid <= max_pid:
      raise ValueError(f"identity {pid} outside 0..{max_pid} in file name {path}")
    out.append(ReIDRecord(path, pid, cam - 1, -1, pid))
  return out


def _read_person(name: str, root: str, candidates: Sequence[str], *, max_pid: Optional[int],
                 num_cams: int, skip_junk: bool, example: str) -> ReIDDataset:
  dirs = ("bounding_box_train", "query", "bounding_box_test")
  base = _resolve_dir(name, root, candidates, dirs)
  splits = [_read_bbox_dir(os.path.join(base, d), max_pid=max_pid, num_cams=num_cams,
                           skip_junk=skip_junk, example=example) for d in dirs]
  train, id_map = _relabel(name, splits[0])
  return ReIDDataset(name, train, splits[1], splits[2], id_map, root=base)


def read_market1501(root: str) -> ReIDDataset:
  """Market-1501. pid -1 (junk) is skipped in every split; pid 0 (distractors) is kept in
  the gallery as a negative; cameras 1..6 become 0..5."""
  return _read_person("market1501", root, ("Market-1501-v15.09.15", "Market-1501", ""),
                      max_pid=1501, num_cams=6, skip_junk=True, example="0002_c1s1_000451_03.jpg")


def read_dukemtmc(root: str) -> ReIDDataset:
  """DukeMTMC-reID; cameras 1..8. The reference filters no pid -1 here (Duke has none)."""
  return _read_person("dukemtmc", root, ("dukemtmcreid/DukeMTMC-reID", "DukeMTMC-reID", ""),
                      max_pid=None, num_cams=8, skip_junk=False, example="0001_c2_f0046182.jpg")


def read_occ_duke(root: str) -> ReIDDataset:
  """Occluded-Duke: Duke's naming under `Occluded_Duke`."""
  return _read_person("occ_duke", root, ("dukemtmcreid/Occluded_Duke", "Occluded_Duke", ""),
                      max_pid=None, num_cams=8, skip_junk=False, example="0001_c2_f0046182.jpg")


# ---------------------------------------------------------------------------------------------
# MSMT17 (V1)


def _read_msmt_list(list_path: str, img_dir: str) -> list[ReIDRecord]:
  _require_file(list_path, "MSMT17 list file")
  out = []
  with open(list_path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      try:
        rel, pid = parts[0], int(parts[1])
        # camera = third '_' field of the file name: 0000_000_01_0303morning_0015_0.jpg -> 01
        cam = int(os.path.basename(rel).split("_")[2])
      except (IndexError, ValueError):
        raise ValueError(f"{list_path}:{lineno}: cannot parse {line.strip()!r} "
                         "(expected 'train/0000_000_01_0303morning_0015_0.jpg 0'-style "
                         "'relative/path pid' with the camera in the third '_' field)") from None
      out.append(ReIDRecord(os.path.join(img_dir, rel), pid, cam - 1, -1, pid))
  return out


def _check_contiguous(name: str, list_path: str, records: list[ReIDRecord]) -> None:
  # The reference asserts that list pids are already 0..n-1, since it does not relabel.
  ids = sorted({r.pid for r in records})
  if ids != list(range(len(ids))):
    raise ValueError(f"{name}: identities in {list_path} are not 0..{len(ids) - 1}; "
                     "expected the MSMT17 V1 lists")


def _refuse_msmt17_v2(root: str) -> None:
  """The V2 release (mask_train_v2 / mask_test_v2: blurred faces, other images) gives
  clearly lower numbers than the V1 the reference's results use; refuse it by name."""
  root = os.path.expanduser(str(root))
  for cand in ("MSMT17_V2", "MSMT17", ""):
    base = os.path.join(root, cand) if cand else root
    found = [d for d in ("mask_train_v2", "mask_test_v2") if os.path.isdir(os.path.join(base, d))]
    if found:
      raise ValueError(
          f"msmt17: {base} is the MSMT17 V2 release ({', '.join(found)}); the CLIP-ReID "
          "recipe and its reported numbers use MSMT17 V1 (train/, test/ and list_train.txt, "
          "list_val.txt, list_query.txt, list_gallery.txt): set data.root to the V1 folder")


def read_msmt17(root: str) -> ReIDDataset:
  """MSMT17 V1: train = list_train + list_val (as the reference); camera from the file name.

  A V2 layout (mask_train_v2 / mask_test_v2) without a V1 folder beside it is an error.

  List lines are 'relpath pid' with relpath relative to `train/` or `test/` (the V1 lists
  write e.g. `0000/0000_000_01_0303morning_0015_0.jpg`).
  """
  name = "msmt17"
  try:
    base = _resolve_dir(name, root, ("MSMT17", "MSMT17_V1", ""), ("train", "test"))
  except FileNotFoundError:
    _refuse_msmt17_v2(root)
    raise
  train_dir, test_dir = os.path.join(base, "train"), os.path.join(base, "test")
  lists = {k: os.path.join(base, f"list_{k}.txt") for k in ("train", "val", "query", "gallery")}
  train = _read_msmt_list(lists["train"], train_dir)
  val = _read_msmt_list(lists["val"], train_dir)
  _check_contiguous(name, lists["train"], train)
  _check_contiguous(name, lists["val"], val)
  query = _read_msmt_list(lists["query"], test_dir)
  gallery = _read_msmt_list(lists["gallery"], test_dir)
  train, id_map = _relabel(name, train + val)  # identity map: pids are already 0..n-1
  return ReIDDataset(name, train, query, gallery, id_map, root=base)


# ---------------------------------------------------------------------------------------------
# VeRi-776

_VERI_RE = re.compile(r"([-\d]+)_c(\d+)")


def read_veri_views(path: str) -> dict[str, int]:
  """Viewpoint labels: file basename -> last integer on the line (orientation class 0..7).

  The keypoint files (github.com/Zhongdao/VehicleReIDKeyPointData, shipped in the reference
  as `datasets/keypoint_{train,test}.txt`) hold one image per line: path, keypoint
  coordinates, orientation last. Only the basename of the first field and the last field
  are read, as in the reference; a repeated basename keeps its last value.
  """
  _require_file(path, "VeRi viewpoint (keypoint) file")
  views: dict[str, int] = {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      try:
        views[os.path.basename(parts[0])] = int(parts[-1])
      except ValueError:
        raise ValueError(f"{path}:{lineno}: the last field is not an integer viewpoint: "
                         f"{line.strip()[:80]!r}") from None
  return views


def read_veri(root: str, keypoint_train: Optional[str] = None,
              keypoint_test: Optional[str] = None) -> ReIDDataset:
  """VeRi-776 with viewpoint labels; images without a label are dropped (as the reference).

  `keypoint_train` / `keypoint_test` default to `keypoint_train.txt` / `keypoint_test.txt`
  in the VeRi folder (the reference reads them relative to its working directory). Every
  image is looked up by basename in the train file first, then in the test file; this is
  how query images get their labels from the test file. The number dropped per split is in
  `dataset.dropped` and in `summary()`; with the public files about 37,715 / 1,677 / 11,578 of
  37,778 / 1,678 / 11,579 images remain (figures reported in damo-cv/TransReID issue #42).
  """
  name = "veri"
  dirs = ("image_train", "image_query", "image_test")
  base = _resolve_dir(name, root, ("VeRi", "VeRi-776", ""), dirs)
  kp_train = keypoint_train or os.path.join(base, "keypoint_train.txt")
  kp_test = keypoint_test or os.path.join(base, "keypoint_test.txt")
  views_train, views_test = read_veri_views(kp_train), read_veri_views(kp_test)
  splits, dropped = [], {}
  for split, d in zip(SPLITS, dirs):
    out, n_drop = [], 0
    for path in _list_images(os.path.join(base, d)):
      pid, cam = _parse_name(path, _VERI_RE, "0001_c001_00016450_0.jpg")
      if pid == -1:
        continue
      if not 0 <= pid <= 776:
        raise ValueError(f"identity {pid} outside 0..776 in file name {path}")
      if not 1 <= cam <= 20:
        raise ValueError(f"camera index {cam} outside 1..20 in file name {path}")
      key = os.path.basename(path)
      view = views_train.get(key, views_test.get(key))
      if view is None:
        n_drop += 1
        continue
      out.append(ReIDRecord(path, pid, cam - 1, view, pid))
    splits.append(out)
    dropped[split] = n_drop
  train, id_map = _relabel(name, splits[0])
  return ReIDDataset(name, train, splits[1], splits[2], id_map, has_views=True,
                     dropped=dropped, root=base)


# ---------------------------------------------------------------------------------------------
# VehicleID

VEHICLEID_TEST_SIZES = (800, 1600, 2400)
VEHICLEID_TRAIN_IDS = 13164


def _read_name_pid_list(path: str) -> list[tuple[str, int]]:
  _require_file(path, "VehicleID list file")
  out = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2:
        raise ValueError(f"{path}:{lineno}: expected 'image_name vehicle_id', got {line.strip()!r}")
      try:
        out.append((parts[0], int(parts[1])))
      except ValueError:
        raise ValueError(f"{path}:{lineno}: vehicle id is not an integer: "
                         f"{line.strip()!r}") from None
  return out


def _group_by_pid(pairs: list[tuple[str, int]]) -> dict[int, list[str]]:
  groups: dict[int, list[str]] = {}
  for name, pid in pairs:  # dict keeps first-appearance order, like the reference
    groups.setdefault(pid, []).append(name)
  return groups


def _vehicleid_paths(name: str, root: str, test_size: int) -> tuple[str, str, str]:
  if test_size not in VEHICLEID_TEST_SIZES:
    raise ValueError(f"vehicleid: test_size must be one of {VEHICLEID_TEST_SIZES}, got {test_size}")
  base = _resolve_dir(name, root, ("VehicleID_V1.0", "VehicleID", ""),
                      ("image", "train_test_split"))
  split_dir = os.path.join(base, "train_test_split")
  return (base, os.path.join(split_dir, "train_list.txt"),
          os.path.join(split_dir, f"test_list_{test_size}.txt"))


def _vehicleid_test(base: str, groups: dict[int, list[str]], rng: np.random.Generator
                    ) -> tuple[list[ReIDRecord], list[ReIDRecord]]:
  """One random gallery image per test identity (camid 1), all others are queries (camid 0).

  The two camera values differ, so the same-id-same-camera filter of the evaluation
  removes nothing, as in the reference.
  """
  img = lambda n: os.path.join(base, "image", n + ".jpg")
  query, gallery = [], []
  for pid, names in groups.items():
    g = int(rng.integers(len(names)))
    query.extend(ReIDRecord(img(n), pid, 0, -1, pid) for i, n in enumerate(names) if i != g)
    gallery.append(ReIDRecord(img(names[g]), pid, 1, -1, pid))
  return query, gallery


def _read_vehicleid_test_groups(test_list: str, test_size: int,
                                check_counts: bool) -> dict[int, list[str]]:
  groups = _group_by_pid(_read_name_pid_list(test_list))
  if check_counts and len(groups) != test_size:
    raise ValueError(f"vehicleid: {test_list} should list {test_size} vehicles but lists "
                     f"{len(groups)}")
  return groups


def read_vehicleid(root: str, test_size: int = 800, seed: int = 0, trial: int = 0,
                   check_counts: bool = True) -> ReIDDataset:
  """VehicleID: train = train_list.txt (relabelled); test = one random gallery split.

  The gallery draw is trial `trial` of `vehicleid_trials(root, test_size, seed)`. With
  `check_counts`, the reference's assertions apply (13,164 train ids; test ids = test_size).
  """
  name = "vehicleid"
  base, train_list, test_list = _vehicleid_paths(name, root, test_size)
  groups = _group_by_pid(_read_name_pid_list(train_list))
  if check_counts and len(groups) != VEHICLEID_TRAIN_IDS:
    raise ValueError(f"vehicleid: {train_list} should list {VEHICLEID_TRAIN_IDS} training vehicles "
                     f"but lists {len(groups)}")
  img = lambda n: os.path.join(base, "image", n + ".jpg")
  # Train images grouped by sorted vehicle id, each group in file order (as the reference).
  train = [ReIDRecord(img(n), pid, 0, -1, pid) for pid in sorted(groups) for n in groups[pid]]
  train, id_map = _relabel(name, train)
  test_groups = _read_vehicleid_test_groups(test_list, test_size, check_counts)
  query, gallery = _vehicleid_test(base, test_groups, _trial_rng(seed, trial))
  return ReIDDataset(f"{name}-{test_size}", train, query, gallery, id_map, root=base)


def _trial_rng(seed: int, trial: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(trial), 0xFFFF_FE00])


def vehicleid_trials(root: str, test_size: int = 800, seed: int = 0, num_trials: int = 10,
                     check_counts: bool = True) -> list[tuple[list[ReIDRecord], list[ReIDRecord]]]:
  """`num_trials` (query, gallery) draws of the VehicleID test protocol; average R1/R5 over them.

  Trial t equals the test split of `read_vehicleid(root, test_size, seed, trial=t)`.
  """
  base, _, test_list = _vehicleid_paths("vehicleid", root, test_size)
  groups = _read_vehicleid_test_groups(test_list, test_size, check_counts)
  return [_vehicleid_test(base, groups, _trial_rng(seed, t)) for t in range(num_trials)]


# ---------------------------------------------------------------------------------------------
# Generic: a user's own data

_GENERIC_CAM_RE = re.compile(r"^c?(\d+)_")


def _generic_folder_split(folder: str) -> list[tuple[str, int, int, int]]:
  out = []
  _require_dir(folder, "generic dataset split")
  for id_name in sorted(os.listdir(folder)):
    id_dir = os.path.join(folder, id_name)
    if not os.path.isdir(id_dir):
      continue
    try:
      pid = int(id_name)
    except ValueError:
      raise ValueError(f"identity folder name is not an integer: {id_dir}") from None
    for path in _list_images(id_dir, IMAGE_EXTS):
      m = _GENERIC_CAM_RE.match(os.path.basename(path))
      if m is None:
        raise ValueError(f"cannot parse the camera from file name {path} "
                         "(expected '<camera>_<anything>.jpg', e.g. '3_0001.jpg' or 'c3_0001.jpg')")
      out.append((path, pid, int(m.group(1)), -1))
  if not out:
    raise FileNotFoundError(f"no images found under identity folders in: {folder}")
  return out


def _generic_list_split(list_path: str, root: str) -> list[tuple[str, int, int, int]]:
  out = []
  with open(list_path) as f:
    for lineno, line in enumerate(f, 1):
      s = line.split("#", 1)[0].strip()
      if not s:
        continue
      parts = s.split()
      if len(parts) not in (3, 4):
        raise ValueError(f"{list_path}:{lineno}: expected 'path pid camid [viewid]', "
                         f"got {line.strip()!r}")
      try:
        pid, cam = int(parts[1]), int(parts[2])
        view = int(parts[3]) if len(parts) == 4 else -1
      except ValueError:
        raise ValueError(f"{list_path}:{lineno}: pid, camid and viewid must be integers: "
                         f"{line.strip()!r}") from None
      out.append((os.path.join(root, parts[0]), pid, cam, view))
  if not out:
    raise ValueError(f"list file has no entries: {list_path}")
  return out


def read_generic(root: str, name: str = "generic") -> ReIDDataset:
  """A user's own data, in one of two forms under `root`:

  * list files `train.txt`, `query.txt`, `gallery.txt`: one image per line,
    `relative/path.jpg pid camid [viewid]` (paths relative to `root`; '#' starts a comment);
  * folders `train/`, `query/`, `gallery/`, each holding one folder per identity named by
    an integer id, with images named `<camid>_<anything>.jpg` (or `c<camid>_...`).

  List files win when `train.txt` exists. Train identities are relabelled 0..N-1 in sorted
  order; query and gallery keep their ids, which must match across the two. Camera values
  are relabelled to 0..C-1 over the sorted union of all splits, so any numbering works.
  Viewpoints (list form only) must be 0-based; -1 or a missing column means none.
  """
  root = os.path.expanduser(str(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{name}: dataset root folder not found: {root}")
  if os.path.isfile(os.path.join(root, "train.txt")):
    raw = []
    for split in SPLITS:
      p = os.path.join(root, f"{split}.txt")
      _require_file(p, f"{name} list file")
      raw.append(_generic_list_split(p, root))
  else:
    missing = [s for s in SPLITS if not os.path.isdir(os.path.join(root, s))]
    if missing:
      raise FileNotFoundError(
          f"{name}: found neither list files ({os.path.join(root, 'train.txt')}) nor split folders "
          f"under {root}; missing: {', '.join(os.path.join(root, s) for s in missing)}")
    raw = [_generic_folder_split(os.path.join(root, s)) for s in SPLITS]
  cams = {c: i for i, c in enumerate(sorted({r[2] for split in raw for r in split}))}
  splits = [[ReIDRecord(p, pid, cams[c], v, pid) for p, pid, c, v in split] for split in raw]
  has_views = any(r.viewid >= 0 for split in splits for r in split)
  train, id_map = _relabel(name, splits[0])
  return ReIDDataset(name, train, splits[1], splits[2], id_map, has_views=has_views, root=root)


# ---------------------------------------------------------------------------------------------
# Factory

READERS = {
    "market1501": read_market1501,
    "dukemtmc": read_dukemtmc,
    "occ_duke": read_occ_duke,
    "msmt17": read_msmt17,
    "veri": read_veri,
    "vehicleid": read_vehicleid,
    "generic": read_generic,
}


def build_reid_dataset(name: str, root: str, **kw) -> ReIDDataset:
  """Build a dataset by the reference's factory key (case-insensitive) or 'generic'."""
  key = name.lower()
  if key not in READERS:
    raise ValueError(f"unknown ReID dataset {name!r}; expected one of {sorted(READERS)}")
  return READERS[key](root, **kw)
