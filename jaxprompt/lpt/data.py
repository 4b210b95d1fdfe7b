"""Long-tailed classification datasets: CIFAR-100-LT, Places-LT, iNaturalist 2018.

Each loader returns an `LTDataset`: a list of `LTRecord(image, label)` where `image`
is a file path or a uint8 HWC array, plus the number of classes. Training class counts
come from the data (`LTDataset.class_counts()`), as `train_dataset.label_freq` does in
the reference, never from hard-coded tables.

CIFAR-100-LT follows the reference's `IMBALANCECIFAR100` (DongSky/LPT
phase2_test/vtab/imbalanced_cifar.py): per-class
counts int(img_max * (1/ratio)^(i/(C-1))) and, for each class in order, its indices in
the original CIFAR-100 train order shuffled with one numpy `RandomState(42)` stream
(the training script seeds numpy's global RNG with 42 just before), keeping the first
n_i.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

CIFAR_LT_RATIOS = (10, 50, 100, 200)
PLACES_LT_NUM_CLASSES = 365
INAT2018_NUM_CLASSES = 8142


class LTRecord(NamedTuple):
  """One example: `image` is a path (str) or a uint8 (H, W, 3) array; `label` an int."""
  image: Union[str, np.ndarray]
  label: int


@dataclass(frozen=True)
class LTDataset:
  """Records of one split plus the label space."""
  records: List[LTRecord]
  num_classes: int
  class_names: Optional[Tuple[str, ...]] = None

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> LTRecord:
    return self.records[i]

  @property
  def labels(self) -> np.ndarray:
    return labels_of(self.records)

  def class_counts(self) -> np.ndarray:
    return class_counts(self.records, self.num_classes)


def labels_of(records: Sequence[Union[LTRecord, int]]) -> np.ndarray:
  """(N,) int64 labels of records (or of plain ints)."""
  return np.fromiter((r.label if isinstance(r, LTRecord) else int(r) for r in records),
                     dtype=np.int64, count=len(records))


def class_counts(records: Sequence[Union[LTRecord, int]], num_classes: int) -> np.ndarray:
  """(num_classes,) number of records per class; labels outside the range are an error."""
  labels = labels_of(records)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
  return np.bincount(labels, minlength=num_classes).astype(np.int64)


def load_image(record: LTRecord) -> np.ndarray:
  """The record's image as uint8 (H, W, 3) RGB (PIL `convert('RGB')`, as the reference)."""
  if isinstance(record.image, np.ndarray):
    return record.image
  from PIL import Image
  with open(record.image, "rb") as f:
    return np.asarray(Image.open(f).convert("RGB"))


# ----------------------------------------------------------------------------- CIFAR-100-LT


def cifar_lt_img_num_per_cls(ratio: float, num_classes: int = 100,
                             img_max: float = 500.0) -> List[int]:
  """The reference's 'exp' profile: int(img_max * (1/ratio)^(i/(C-1))) for i = 0..C-1."""
  if ratio < 1:
    raise ValueError(f"imbalance ratio must be >= 1 (max/min), got {ratio}")
  factor = 1.0 / ratio  # equals the reference's literals 0.01/0.02/0.1 bit for bit
  return [int(img_max * (factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def cifar_lt_select(labels: Any, ratio: float, seed: int = 42,
                    num_classes: Optional[int] = None) -> np.ndarray:
  """Indices of the long-tailed subset, in the reference's order (class 0's, class 1's, ...).

  img_max = len(labels) / C as in the reference (500 for CIFAR-100). One RandomState(seed)
  is used for the per-class shuffles in class order, matching `np.random.seed(42)`
  followed by `np.random.shuffle` per class.
  """
  labels = np.asarray(labels, dtype=np.int64)
  classes = np.unique(labels)
  num_classes = int(num_classes or classes.size)
  counts = cifar_lt_img_num_per_cls(ratio, num_classes, labels.size / num_classes)
  rng = np.random.RandomState(seed)
  picked = []
  for the_class, n in zip(classes, counts):
    idx = np.where(labels == the_class)[0]
    rng.shuffle(idx)
    picked.append(idx[:n])
  return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def _cifar_dir(root: PathLike) -> str:
  root = os.fspath(root)
  sub = os.path.join(root, "cifar-100-python")
  return sub if os.path.isdir(sub) else root


def read_cifar100_python(root: PathLike, split: str = "train"
                         ) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
  """(images uint8 (N, 32, 32, 3), fine labels (N,), class names) from the python pickles.

  `root` is the folder holding `cifar-100-python/` or that folder itself.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  folder = _cifar_dir(root)
  path = os.path.join(folder, split)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CIFAR-100 python-version file not found: {path}")
  with open(path, "rb") as f:
    entry = pickle.load(f, encoding="latin1")
  try:
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry["fine_labels"], dtype=np.int64)
  except KeyError as e:
    raise ValueError(f"{path}: missing key {e} (expected 'data' and 'fine_labels')") from None
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored CHW, row-major
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
  names: Tuple[str, ...] = ()
  meta = os.path.join(folder, "meta")
  if os.path.isfile(meta):
    with open(meta, "rb") as f:
      names = tuple(pickle.load(f, encoding="latin1").get("fine_label_names", ()))
  return images, labels, names


def read_cifar100_tfds(split: str = "train", data_dir: Optional[PathLike] = None
                       ) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
  """Same as `read_cifar100_python` from a TFDS `cifar100` prepared as array_record.

  Uses `tfds.data_source` (no TensorFlow needed to read; preparing the dataset does
  need it). TFDS stores examples in a shuffled order; they are put back in the original
  file order by the numeric suffix of their `id` ('train_00042'), which the subset
  selection depends on.
  """
  import tensorflow_datasets as tfds
  source = tfds.data_source("cifar100", split=split, data_dir=data_dir, download=False)
  examples = [source[i] for i in range(len(source))]
  ids = [ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"]) for ex in examples]
  order = np.argsort([int(s.rsplit("_", 1)[-1]) for s in ids], kind="stable")
  images = np.stack([np.asarray(examples[i]["image"], np.uint8) for i in order])
  labels = np.asarray([int(examples[i]["label"]) for i in order], np.int64)
  names: Tuple[str, ...] = ()
  info = getattr(source, "dataset_info", None)
  if info is not None:
    names = tuple(info.features["label"].names)
  return images, labels, names


def load_cifar100_lt(root: Optional[PathLike], ratio: float, split: str = "train", *,
                     seed: int = 42, source: str = "python") -> LTDataset:
  """CIFAR-100-LT: imbalanced train subset for `ratio` (10, 50, 100, 200), or the full test set.

  source: 'python' (the `cifar-100-python` pickles under `root`) or 'tfds' (`root` is
  the TFDS data_dir, or None for the default).
  """
  if source == "python":
    images, labels, names = read_cifar100_python(root, split)
  elif source == "tfds":
    images, labels, names = read_cifar100_tfds(split, root)
  else:
    raise ValueError(f"source must be 'python' or 'tfds', got {source!r}")
  if split == "train":
    idx = cifar_lt_select(labels, ratio, seed, num_classes=100)
  else:
    idx = np.arange(labels.shape[0])  # test set stays balanced (100 per class)
  records = [LTRecord(images[i], int(labels[i])) for i in idx]
  return LTDataset(records, 100, names or None)


# ----------------------------------------------------------------------------- list files


def _raise_missing(missing: list[str]) -> None:
  """One error listing the first few listed-but-absent images (each with file:line)."""
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise FileNotFoundError(f"{len(missing)} image(s) listed but not found{more}:\n  "
                            + "\n  ".join(missing[:5]))


def read_lt_list(list_file: PathLike, root: PathLike, *, num_classes: Optional[int] = None,
                 check_files: bool = True) -> List[LTRecord]:
  """Parse a `<relative path> <integer label>` list (Places-LT, ImageNet-LT, iNat txt).

  Errors name the list file and the 1-based line: malformed lines, bad or out-of-range
  labels, and (with check_files) images missing under `root`.
  """
  list_file = os.fspath(list_file)
  root = os.fspath(root)
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"list file not found: {list_file}")
  records: List[LTRecord] = []
  missing: List[str] = []
  with open(list_file) as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue  # blank lines (e.g. a trailing newline) carry nothing
      if len(parts) != 2:
        raise ValueError(f"{list_file}:{lineno}: expected '<path> <label>', got {line.rstrip()!r}")
      try:
        label = int(parts[1])
      except ValueError:
        raise ValueError(f"{list_file}:{lineno}: label {parts[1]!r} is not an integer") from None
      if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"{list_file}:{lineno}: label {label} outside [0, {num_classes})")
      path = os.path.join(root, parts[0])
      if check_files and not os.path.isfile(path):
        missing.append(f"{list_file}:{lineno}: {path}")
      records.append(LTRecord(path, label))
  _raise_missing(missing)
  return records


def load_places_lt(root: PathLike, split: str = "train", *, lists_dir: Optional[PathLike] = None,
                   check_files: bool = True) -> LTDataset:
  """Places-LT over a Places365-Standard folder; lists `Places_LT_{split}.txt`.

  split: 'train', 'val' or 'test' (the reference evaluates on 'test'). `lists_dir`
  defaults to `root`.
  """
  if split not in ("train", "val", "test"):
    raise ValueError(f"split must be train/val/test, got {split!r}")
  list_file = os.path.join(os.fspath(lists_dir or root), f"Places_LT_{split}.txt")
  records = read_lt_list(list_file, root, num_classes=PLACES_LT_NUM_CLASSES,
                         check_files=check_files)
  return LTDataset(records, PLACES_LT_NUM_CLASSES)


# ----------------------------------------------------------------------------- iNaturalist


def load_inat2018_json(json_file: PathLike, root: PathLike, *, check_files: bool = True
                       ) -> LTDataset:
  """iNaturalist 2018 from its COCO-style `train2018.json` / `val2018.json`.

  Label = category id (0..8141 in the 2018 release, the same ids the txt lists use);
  images keep the file order of `images`. Images without an annotation (the test
  split) are an error.
  """
  json_file = os.fspath(json_file)
  root = os.fspath(root)
  with open(json_file) as f:
    try:
      ann = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{json_file}: not valid JSON ({e})") from None
  for key in ("images", "annotations", "categories"):
    if key not in ann:
      raise ValueError(f"{json_file}: missing top-level key {key!r}")
  cat_ids = sorted(int(c["id"]) for c in ann["categories"])
  if cat_ids != list(range(len(cat_ids))):
    raise ValueError(f"{json_file}: category ids are not 0..{len(cat_ids) - 1}")
  label_of = {}
  for a in ann["annotations"]:
    label_of[int(a["image_id"])] = int(a["category_id"])
  records: List[LTRecord] = []
  missing: List[str] = []
  for i, img in enumerate(ann["images"]):
    img_id = int(img["id"])
    if img_id not in label_of:
      raise ValueError(f"{json_file}: image id {img_id} ({img.get('file_name')}) has no annotation")
    label = label_of[img_id]
    if not 0 <= label < len(cat_ids):
      raise ValueError(f"{json_file}: image id {img_id} has unknown category {label}")
    path = os.path.join(root, img["file_name"])
    if check_files and not os.path.isfile(path):
      missing.append(f"{json_file}: images[{i}] {path}")
    records.append(LTRecord(path, label))
  _raise_missing(missing)
  names = tuple(c.get("name", str(c["id"])) for c in sorted(ann["categories"],
                                                             key=lambda c: int(c["id"])))
  return LTDataset(records, len(cat_ids), names)


def load_inat2018_list(list_file: PathLike, root: PathLike, *,
                       num_classes: int = INAT2018_NUM_CLASSES,
                       check_files: bool = True) -> LTDataset:
  """iNaturalist 2018 from the txt-list form (`iNaturalist18_train.txt`, `..._val.txt`)."""
  return LTDataset(read_lt_list(list_file, root, num_classes=num_classes,
                                check_files=check_files), num_classes)


DATASETS = ("places_lt", "cifar100_lt", "inat2018", "list", "synthetic")


def synthetic_lt(num_classes: int = 10, image_size: int = 16, max_count: int = 60,
                 min_count: int = 3, test_per_class: int = 10, seed: int = 0
                 ) -> tuple[LTDataset, LTDataset]:
  """A generated long-tailed set of uint8 arrays: counts fall geometrically from
  max_count to min_count; each class is a random colour pattern plus noise."""
  rng = np.random.default_rng(seed)
  ratio = max_count / max(min_count, 1)
  counts = [max(int(max_count * ratio ** (-i / max(num_classes - 1, 1))), min_count)
            for i in range(num_classes)]
  proto = rng.uniform(40, 215, size=(num_classes, 4, 4, 3))

  def make(label: int) -> np.ndarray:
    base = np.kron(proto[label], np.ones((image_size // 4 + 1, image_size // 4 + 1, 1)))
    img = base[:image_size, :image_size] + rng.normal(0, 25, (image_size, image_size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)

  train = [LTRecord(make(y), y) for y, n in enumerate(counts) for _ in range(n)]
  test = [LTRecord(make(y), y) for y in range(num_classes) for _ in range(test_per_class)]
  return LTDataset(train, num_classes), LTDataset(test, num_classes)


def load_datasets(config, *, check_train_files: bool = True
                  ) -> tuple[LTDataset, LTDataset]:
  """(train, test) for `data.name`.

  `check_train_files=False` reads the train labels without checking that the images
  exist (evaluation needs only the class counts).
  """
  d = config.data
  name = d.name
  check = bool(d.check_files)
  check_train = check and check_train_files
  if name == "synthetic":
    return synthetic_lt(**dict(d.synthetic))
  if name == "cifar100_lt":
    root = d.root or None
    # The subset is part of the dataset, not of the run: DongSky/LPT builds it under
    # np.random.seed(42), so changing config.seed must not change the images.
    return (load_cifar100_lt(root, d.imbalance_ratio, "train", seed=42,
                                      source=d.cifar_source),
            load_cifar100_lt(root, d.imbalance_ratio, "test", source=d.cifar_source))
  if name == "places_lt":
    lists = d.lists_dir or None
    return (load_places_lt(d.root, "train", lists_dir=lists, check_files=check_train),
            load_places_lt(d.root, d.test_split, lists_dir=lists, check_files=check))
  if name == "inat2018":
    if not (d.train_file and d.test_file):
      raise ValueError("inat2018 needs data.train_file and data.test_file (json or txt lists)")
    def one(path, check_files):
      if path.endswith(".json"):
        return load_inat2018_json(path, d.root, check_files=check_files)
      return load_inat2018_list(path, d.root, check_files=check_files)
    return one(d.train_file, check_train), one(d.test_file, check)
  if name == "list":
    if not (d.train_file and d.test_file):
      raise ValueError("dataset 'list' needs data.train_file and data.test_file")
    nc = int(d.num_classes) or None
    tr = read_lt_list(d.train_file, d.root, num_classes=nc, check_files=check_train)
    te = read_lt_list(d.test_file, d.root, num_classes=nc, check_files=check)
    nc = nc or int(max(r.label for r in tr + te)) + 1
    return LTDataset(tr, nc), LTDataset(te, nc)
  raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
