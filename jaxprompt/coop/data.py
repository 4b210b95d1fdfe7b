"""Datasets of the CoOp/CoCoOp benchmarks, few-shot sampling, the base/new split, transforms.

Layouts follow KaiyangZhou/CoOp `DATASETS.md` and `datasets/*.py`:

* 10 datasets read `split_zhou_<Name>.json` ({"train","val","test"}: lists of
  [relative path, label, class name]) next to their image folder;
* FGVCAircraft reads the official `images_variant_{train,val,test}.txt` and `variants.txt`;
* ImageNet reads `images/{train,val}/<wnid>/` and `classnames.txt` ("<wnid> <name>" lines);
  its variants (V2, Sketch, A, R) are test-only and reuse ImageNet's class names (A and R: the
  200 wnids of their own folders, sorted).

Few-shot sampling is KaiyangZhou/Dassl.pytorch `generate_fewshot_dataset`: per class, in the
order classes first appear in the split list, `random.sample(items, K)` from one Python RNG
seeded with the run seed, train first, then val with min(K, 4) shots. The base/new split
(`subsample_classes`) sorts the training labels, keeps the first ceil(n/2) (base) or the rest
(new), and re-indexes the labels, after few-shot sampling.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from jaxprompt.data.files import list_images, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Datum:
  impath: str
  label: int
  classname: str


@dataclasses.dataclass
class Splits:
  train: list[Datum]
  val: list[Datum]
  test: list[Datum]
  classnames: list[str]  # index = label

  def counts(self) -> dict:
    return dict(train=len(self.train), val=len(self.val), test=len(self.test),
                classes=len(self.classnames))


# name -> (folder under the data root, image folder inside it, split file, zero-shot template)
DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   "a photo of a {}."),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    "a photo of a {}, a type of pet."),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       "a photo of a {}, a type of flower."),
    "food101": ("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "fgvc_aircraft": ("fgvc_aircraft", "images", "", "a photo of a {}, a type of aircraft."),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               "a photo of a person doing {}."),
    "imagenet": ("imagenet", "images", "", "a photo of a {}."),
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "", "a photo of a {}."),
    "imagenet_sketch": ("imagenet-sketch", "images", "", "a photo of a {}."),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "", "a photo of a {}."),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "", "a photo of a {}."),
    "folder": ("", "", "", "a photo of a {}."),
}
TEST_ONLY = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def template(name: str) -> str:
  return DATASETS[_check_name(name)][3]


def _check_name(name: str) -> str:
  key = name.lower()
  if key not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
  return key


# ----------------------------------------------------------------------------- readers


def read_split_json(path: str, image_dir: str) -> dict[str, list[Datum]]:
  """`split_zhou_*.json` -> {'train','val','test'} lists of Datum with absolute paths."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"split file not found: {path}")
  with open(path) as f:
    try:
      obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  out = {}
  for key in ("train", "val", "test"):
    if key not in obj:
      raise ValueError(f"{path}: missing key {key!r} (expected 'train', 'val', 'test')")
    items = []
    for i, row in enumerate(obj[key]):
      if not (isinstance(row, (list, tuple)) and len(row) == 3):
        raise ValueError(f"{path}: {key}[{i}] must be [path, label, classname], got {row!r}")
      items.append(Datum(os.path.join(image_dir, row[0]), int(row[1]), str(row[2])))
    out[key] = items
  return out


def read_classnames(path: str) -> dict[str, str]:
  """ImageNet's `classnames.txt`: "<wnid> <class name>" per line, in file order."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ImageNet class-name file not found: {path}")
  out = collections.OrderedDict()
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      wnid, _, name = line.partition(" ")
      if not name:
        raise ValueError(f"{path}:{n}: expected '<wnid> <class name>', got {line!r}")
      out[wnid] = name.strip()
  return out


def _listdir(path: str, sort: bool) -> list[str]:
  """Dassl's listdir_nohidden: hidden entries dropped; os.listdir order unless sorted."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"folder not found: {path}")
  items = [f for f in os.listdir(path) if not f.startswith(".")]
  return sorted(items) if sort else items


def read_class_folders(image_dir: str, folders: Sequence[str], names: Sequence[str],
                       labels: Optional[Sequence[int]] = None, sort_images: bool = False
                       ) -> list[Datum]:
  out = []
  for i, (folder, name) in enumerate(zip(folders, names)):
    label = i if labels is None else labels[i]
    for im in _listdir(os.path.join(image_dir, folder), sort_images):
      out.append(Datum(os.path.join(image_dir, folder, im), int(label), name))
  return out


def read_imagenet(root: str, split: str = "train", sort_images: bool = False) -> list[Datum]:
  """`imagenet/images/{train,val}/<wnid>/`: labels = sorted wnid order; images in directory
  listing order (the reference's; pass sort_images=True for a filesystem-independent order)."""
  names = read_classnames(os.path.join(root, "imagenet", "classnames.txt"))
  image_dir = os.path.join(root, "imagenet", "images", split)
  folders = _listdir(image_dir, sort=True)
  missing = [f for f in folders if f not in names]
  if missing:
    raise ValueError(f"{image_dir}: folders {missing[:5]} are not in classnames.txt")
  return read_class_folders(image_dir, folders, [names[f] for f in folders],
                            sort_images=sort_images)


def read_imagenet_variant(name: str, root: str, classnames_file: str) -> tuple[list[Datum],
                                                                                list[str]]:
  """Test sets of ImageNetV2 (folders 0..999), -Sketch (wnid folders), -A and -R (their own
  200 wnid folders, sorted, labels 0..199). Returns (test items, class names by label)."""
  names = read_classnames(classnames_file)
  wnids = list(names)
  folder, sub = DATASETS[name][:2]
  image_dir = os.path.join(root, folder, sub)
  if name == "imagenetv2":
    folders = [str(i) for i in range(len(wnids))]
    cls = [names[w] for w in wnids]
  elif name == "imagenet_sketch":
    folders, cls = wnids, [names[w] for w in wnids]
  else:
    folders = [f for f in _listdir(image_dir, sort=True) if os.path.isdir(os.path.join(image_dir, f))]
    unknown = [f for f in folders if f not in names]
    if unknown:
      raise ValueError(f"{image_dir}: folders {unknown[:5]} are not in {classnames_file}")
    cls = [names[f] for f in folders]
  return read_class_folders(image_dir, folders, cls), cls


def read_fgvc_aircraft(root: str) -> dict[str, list[Datum]]:
  """KaiyangZhou/CoOp datasets/fgvc_aircraft.py: labels in `variants.txt` order."""
  base = os.path.join(root, DATASETS["fgvc_aircraft"][0])
  variants_file = os.path.join(base, "variants.txt")
  if not os.path.isfile(variants_file):
    raise FileNotFoundError(f"FGVCAircraft variants file not found: {variants_file}")
  with open(variants_file) as f:
    variants = [line.strip() for line in f if line.strip()]
  label = {v: i for i, v in enumerate(variants)}
  out = {}
  for split in ("train", "val", "test"):
    path = os.path.join(base, f"images_variant_{split}.txt")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"FGVCAircraft split file not found: {path}")
    items = []
    with open(path) as f:
      for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        imname, _, variant = line.partition(" ")
        if variant not in label:
          raise ValueError(f"{path}:{n}: variant {variant!r} is not in variants.txt")
        items.append(Datum(os.path.join(base, "images", imname + ".jpg"), label[variant], variant))
    out[split] = items
  return out


def read_folder(root: str) -> list[Datum]:
  """A user's own data: `root/<class name>/*.jpg`, classes sorted, labels in that order
  (`build('folder', root)` reads `root/train/` and `root/test/` when both exist)."""
  classes = [d for d in _listdir(root, sort=True) if os.path.isdir(os.path.join(root, d))]
  if not classes:
    raise FileNotFoundError(f"{root}: no class folders (expected root/<class>/<image>)")
  out = []
  for i, c in enumerate(classes):
    out.extend(Datum(p, i, c) for p in list_images(os.path.join(root, c)))
  return out


def classnames_of(items: Sequence[Datum]) -> list[str]:
  """Dassl `get_lab2cname`: names by sorted label (labels must be 0..n-1)."""
  names = {}
  for d in items:
    names.setdefault(d.label, d.classname)
  labels = sorted(names)
  if labels != list(range(len(labels))):
    raise ValueError(f"labels must be 0..{len(labels) - 1}; got {labels[:10]}...")
  return [names[i] for i in labels]


# ----------------------------------------------------------------------------- sampling


def fewshot(items: Sequence[Datum], shots: int, rng: random.Random,
            repeat: bool = False) -> list[Datum]:
  """Dassl `generate_fewshot_dataset` for one list: classes in first-appearance order."""
  if shots < 1:
    return list(items)
  by_label: dict[int, list[Datum]] = collections.OrderedDict()
  for d in items:
    by_label.setdefault(d.label, []).append(d)
  out = []
  for group in by_label.values():
    if len(group) >= shots:
      out.extend(rng.sample(group, shots))
    elif repeat:
      out.extend(rng.choices(group, k=shots))
    else:
      out.extend(group)
  return out


def subsample_classes(*lists: Sequence[Datum], subsample: str = "all") -> list[list[Datum]]:
  """Base/new split: sorted labels of the first list, base = first ceil(n/2), labels re-indexed."""
  if subsample == "all":
    return [list(x) for x in lists]
  if subsample not in ("base", "new"):
    raise ValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
  labels = sorted({d.label for d in lists[0]})
  m = math.ceil(len(labels) / 2)
  keep = labels[:m] if subsample == "base" else labels[m:]
  relabel = {y: i for i, y in enumerate(keep)}
  return [[dataclasses.replace(d, label=relabel[d.label]) for d in x if d.label in relabel]
          for x in lists]


def build(name: str, root: str, *, shots: int = 16, seed: int = 1, subsample: str = "all",
          classnames_file: str = "") -> Splits:
  """One dataset ready for training/evaluation, as the reference builds it for (shots, seed)."""
  name = _check_name(name)
  folder, sub, split_file, _ = DATASETS[name]
  if name in TEST_ONLY:
    cf = classnames_file or os.path.join(root, "imagenet", "classnames.txt")
    test, cls = read_imagenet_variant(name, root, cf)
    return Splits([], [], test, cls)
  if name == "imagenet":
    train, test = read_imagenet(root, "train"), read_imagenet(root, "val")
    splits = dict(train=train, val=test, test=test)  # ImageNet's val is its test set
  elif name == "fgvc_aircraft":
    splits = read_fgvc_aircraft(root)
  elif name == "folder":
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
      splits = dict(train=read_folder(os.path.join(root, "train")), val=[],
                    test=read_folder(os.path.join(root, "test")))
    else:  # one folder: train and test are the same images
      items = read_folder(root)
      splits = dict(train=items, val=[], test=items)
  else:
    base = os.path.join(root, folder)
    splits = read_split_json(os.path.join(base, split_file), os.path.join(base, sub))
  train, val, test = splits["train"], splits["val"], splits["test"]
  if shots > 0:
    rng = random.Random(seed)  # equals random.seed(seed) then the module-level functions
    train = fewshot(train, shots, rng)
    val = fewshot(val, min(shots, 4), rng) if name != "imagenet" else val
  train, val, test = subsample_classes(train, val, test, subsample=subsample)
  return Splits(train, val, test, classnames_of(train or test))


# ----------------------------------------------------------------------------- transforms


def _normalize(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float32) / 255.0
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
  """torchvision Resize(int): shorter side -> size, the longer one int(size * long / short)."""
  w, h = img.size
  if (w <= h and w == size) or (h <= w and h == size):
    return img
  if w < h:
    ow, oh = size, int(size * h / w)
  else:
    oh, ow = size, int(size * w / h)
  return img.resize((ow, oh), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  w, h = img.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def test_transform(img: Image.Image, size: int = 224) -> np.ndarray:
  """Shorter side to `size` (bicubic, aspect kept), centre crop, CLIP normalisation; HWC."""
  return _normalize(np.asarray(center_crop(resize_shorter(img, size), size)))


def random_resized_crop_box(rng: np.random.Generator, w: int, h: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params with a numpy generator: (top, left, h, w)."""
  area = w * h
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    ar = math.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_transform(img: Image.Image, rng: np.random.Generator, size: int = 224,
                    scale: Sequence[float] = (0.08, 1.0)) -> np.ndarray:
  """RandomResizedCrop(size, scale, (3/4, 4/3), bicubic), flip p=0.5, CLIP normalisation."""
  top, left, ch, cw = random_resized_crop_box(rng, *img.size, scale=tuple(scale))
  # Crop, then resize (torchvision resized_crop); PIL's resize(box=) would filter across the box.
  img = img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BICUBIC)
  x = np.asarray(img)
  if rng.random() < 0.5:
    x = x[:, ::-1]
  return _normalize(x)


def make_decode(train: bool, size: int = 224, scale: Sequence[float] = (0.08, 1.0)):
  """Loader decode function for Datum records: {'image', 'label'}."""
  def decode(d: Datum, rng: np.random.Generator) -> dict:
    img = load_image(d.impath)
    x = train_transform(img, rng, size, scale) if train else test_transform(img, size)
    return {"image": x, "label": np.int32(d.label)}
  return decode
