"""A synthetic person re-identification set in Market-1501's exact layout and file naming.

    <root>/Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg
                                 query/...
                                 bounding_box_test/...   (+ 0000_* distractors, -1_* junk)

so `jaxprompt.clipreid.data.read_market1501` reads it unchanged. Every identity is a person-like
figure (hair/head, torso with a pattern, arms, trousers/shorts/skirt, shoes, optional hat and
bag) whose colours come from small palettes, so several people share a shirt colour and only a
combination of cues tells them apart. Each camera changes the look in its own way: colour
cast, brightness and gamma, blur, noise, background, framing, a preferred viewpoint (front,
back, side: a backpack is seen from behind, a chest logo from the front) and occluders. Every
image adds its own stride, position, scale, flip and background jitter.

As in Market-1501, test identities give one query per camera for some of their cameras and
every other image goes to the gallery; the gallery also holds pid 0 distractors (partial
figures, background) and pid -1 junk, which readers skip. Train and test identities are
disjoint and their numbers interleave. The output is a function of the arguments alone (same
seed, same bytes); a `synthetic.json` manifest next to the three folders records the
arguments and counts, and lets a second call with the same arguments return at once.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter

DATASET_DIR = "Market-1501-v15.09.15"
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MANIFEST = "synthetic.json"
_FORMAT = 1  # bump when the rendering changes, so cached trees are rebuilt

# Small palettes (RGB 0..1): shared colours make identities collide on single cues.
_SKIN = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.68, 0.48, 0.34],
                  [0.45, 0.31, 0.22]])
_HAIR = np.array([[0.08, 0.07, 0.06], [0.35, 0.22, 0.12], [0.85, 0.72, 0.40],
                  [0.62, 0.62, 0.62]])
_CLOTH = np.array([[0.85, 0.12, 0.12], [0.12, 0.25, 0.75], [0.10, 0.55, 0.20],
                   [0.95, 0.85, 0.15], [0.95, 0.95, 0.95], [0.08, 0.08, 0.08],
                   [0.55, 0.55, 0.58], [0.55, 0.20, 0.65], [0.95, 0.50, 0.10],
                   [0.45, 0.75, 0.90], [0.95, 0.60, 0.75], [0.45, 0.30, 0.15]])
_BOTTOM = np.array([[0.10, 0.15, 0.35], [0.08, 0.08, 0.08], [0.50, 0.50, 0.52],
                    [0.72, 0.64, 0.45], [0.92, 0.92, 0.90], [0.40, 0.25, 0.12],
                    [0.60, 0.10, 0.12]])
_SHOES = np.array([[0.05, 0.05, 0.05], [0.95, 0.95, 0.95], [0.40, 0.25, 0.12],
                   [0.80, 0.15, 0.15]])
_PATTERNS = ("solid", "hstripes", "vstripes", "logo", "twotone")
_BOTTOMS = ("trousers", "shorts", "skirt")
_BAGS = ("none", "backpack", "handbag")
_VIEWS = ("front", "back", "side")


@dataclasses.dataclass(frozen=True)
class _Person:
  skin: np.ndarray
  hair: np.ndarray
  long_hair: bool
  top: np.ndarray
  pattern: str
  accent: np.ndarray
  long_sleeves: bool
  bottom: np.ndarray
  bottom_kind: str
  shoes: np.ndarray
  bag: str
  bag_colour: np.ndarray
  hat: Optional[np.ndarray]
  width: float   # body width factor
  height: float  # body height factor


@dataclasses.dataclass(frozen=True)
class _Camera:
  gain: np.ndarray     # per-channel colour cast
  brightness: float
  gamma: float
  blur: float          # Gaussian sigma in output pixels
  noise: float         # pixel noise sigma (0..255 scale)
  quality: int         # JPEG quality
  views: np.ndarray    # probabilities of front/back/side
  scale: float         # figure height / image height
  bg: np.ndarray
  bg2: np.ndarray
  bg_kind: str
  occlusion: float     # probability of an occluder
  occluder: str
  occluder_colour: np.ndarray


def _pick(rng: np.random.Generator, palette: np.ndarray, avoid: Optional[np.ndarray] = None):
  while True:
    c = palette[rng.integers(len(palette))]
    if avoid is None or not np.allclose(c, avoid):
      return c


def _make_person(rng: np.random.Generator) -> _Person:
  top = _pick(rng, _CLOTH)
  return _Person(
      skin=_pick(rng, _SKIN), hair=_pick(rng, _HAIR), long_hair=bool(rng.random() < 0.35),
      top=top, pattern=_PATTERNS[rng.integers(len(_PATTERNS))], accent=_pick(rng, _CLOTH, top),
      long_sleeves=bool(rng.random() < 0.5), bottom=_pick(rng, _BOTTOM),
      bottom_kind=_BOTTOMS[rng.choice(3, p=[0.6, 0.25, 0.15])], shoes=_pick(rng, _SHOES),
      bag=_BAGS[rng.choice(3, p=[0.45, 0.35, 0.2])], bag_colour=_pick(rng, _CLOTH),
      hat=_pick(rng, _CLOTH) if rng.random() < 0.2 else None,
      width=float(rng.uniform(0.88, 1.15)), height=float(rng.uniform(0.92, 1.0)))


def _make_camera(rng: np.random.Generator) -> _Camera:
  views = rng.dirichlet([0.8, 0.8, 0.8])
  views = 0.15 + 0.55 * views  # every view possible, one usually dominant
  return _Camera(
      gain=np.clip(1.0 + rng.normal(0.0, 0.13, 3), 0.72, 1.28),
      brightness=float(rng.uniform(0.72, 1.15)), gamma=float(rng.uniform(0.8, 1.25)),
      blur=float(rng.choice([0.0, 0.4, 0.7, 1.0])), noise=float(rng.uniform(2.0, 8.0)),
      quality=int(rng.integers(75, 96)), views=views / views.sum(),
      scale=float(rng.uniform(0.78, 0.94)), bg=rng.uniform(0.2, 0.75, 3),
      bg2=rng.uniform(0.15, 0.8, 3), bg_kind=("plain", "hlines", "vlines", "checker",
                                              "gradient")[rng.integers(5)],
      occlusion=float(rng.choice([0.0, 0.1, 0.25])),
      occluder=("pole", "low", "side")[rng.integers(3)], occluder_colour=rng.uniform(0.1, 0.9, 3))


class _Canvas:
  """A float RGB canvas painted with hard-edged shapes; downsampling later anti-aliases them."""

  def __init__(self, h: int, w: int):
    self.h, self.w = h, w
    self.img = np.zeros((h, w, 3), np.float32)
    self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5

  def paint(self, mask: np.ndarray, colour) -> None:
    self.img[mask] = colour

  def rect(self, x0, x1, y0, y1) -> np.ndarray:
    return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

  def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
    return ((self.xx - cx) / rx) ** 2 + ((self.yy - cy) / ry) ** 2 <= 1.0

  def trapezoid(self, cx, y0, y1, half_top, half_bottom) -> np.ndarray:
    t = np.clip((self.yy - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)
    half = half_top + (half_bottom - half_top) * t
    return (self.yy >= y0) & (self.yy < y1) & (np.abs(self.xx - cx) <= half)


def _background(c: _Canvas, cam: _Camera, rng: np.random.Generator) -> None:
  base = np.clip(cam.bg * rng.uniform(0.9, 1.1), 0, 1)
  c.img[:] = base
  period = c.h / rng.uniform(5.0, 9.0)
  phase = rng.uniform(0, period)
  if cam.bg_kind == "hlines":
    c.paint(((c.yy + phase) % period) < period * 0.25, cam.bg2)
  elif cam.bg_kind == "vlines":
    c.paint(((c.xx + phase) % period) < period * 0.2, cam.bg2)
  elif cam.bg_kind == "checker":
    c.paint((((c.xx + phase) // period + (c.yy + phase) // period) % 2) == 1,
            0.5 * (base + cam.bg2))
  elif cam.bg_kind == "gradient":
    t = (c.yy / c.h)[..., None]
    c.img[:] = base * (1 - t) + cam.bg2 * t
  # Low-frequency blotches so no two backgrounds are the same.
  for _ in range(2):
    m = c.ellipse(rng.uniform(0, c.w), rng.uniform(0, c.h), rng.uniform(0.2, 0.5) * c.w,
                  rng.uniform(0.1, 0.3) * c.h)
    c.img[m] *= rng.uniform(0.85, 1.15)


def _figure(c: _Canvas, p: _Person, view: str, *, cx: float, top: float, fh: float,
            stride: float) -> None:
  """Paints the person; coordinates are in canvas pixels, `fh` is the figure height."""
  u = fh  # unit length
  side = view == "side"
  wf = p.width * (0.7 if side else 1.0)
  shoulder, waist = 0.14 * u * wf, 0.12 * u * wf
  y_head, y_neck, y_sh, y_hip = top + 0.085 * u, top + 0.15 * u, top + 0.17 * u, top + 0.52 * u
  y_knee, y_ankle, y_foot = top + 0.72 * u, top + 0.93 * u, top + 0.985 * u
  # Legs (drawn first so the torso and skirt overlap them).
  leg_w = 0.055 * u * p.width
  spread = stride * 0.06 * u
  legs = [cx - 0.045 * u * wf - spread, cx + 0.045 * u * wf + spread] if not side else \
         [cx - spread * 1.5, cx + spread * 1.5]
  for lx in legs:
    leg = c.rect(lx - leg_w, lx + leg_w, y_hip, y_ankle)
    if p.bottom_kind == "trousers":
      c.paint(leg, p.bottom)
    else:
      c.paint(leg, p.skin)
      if p.bottom_kind == "shorts":
        c.paint(leg & (c.yy < y_hip + 0.16 * u), p.bottom)
    c.paint(c.rect(lx - leg_w * 1.1, lx + leg_w * (1.6 if side else 1.1), y_ankle, y_foot), p.shoes)
  if p.bottom_kind == "skirt":
    c.paint(c.trapezoid(cx, y_hip - 0.02 * u, y_hip + 0.2 * u, waist, waist * 1.5), p.bottom)
  elif p.bottom_kind in ("trousers", "shorts"):
    c.paint(c.trapezoid(cx, y_hip - 0.02 * u, y_hip + 0.07 * u, waist, waist * 1.1), p.bottom)
  # Backpack behind the torso in front view: only its sides show.
  if p.bag == "backpack" and view == "front":
    c.paint(c.rect(cx - shoulder * 1.15, cx + shoulder * 1.15, y_sh + 0.03 * u, y_hip - 0.06 * u),
            p.bag_colour)
  # Arms.
  arm_w = 0.035 * u * p.width
  swing = stride * 0.04 * u
  arm_xs = [cx - shoulder - arm_w * 0.6 + swing, cx + shoulder + arm_w * 0.6 - swing]
  if side:
    arm_xs = [cx + swing * 2.0]
  for ax in arm_xs:
    arm = c.rect(ax - arm_w, ax + arm_w, y_sh + 0.01 * u, y_hip + 0.02 * u)
    c.paint(arm, p.skin)
    sleeve_end = y_hip - 0.02 * u if p.long_sleeves else y_sh + 0.11 * u
    c.paint(arm & (c.yy < sleeve_end), p.top)
  # Torso with its pattern.
  torso = c.trapezoid(cx, y_sh, y_hip, shoulder, waist)
  c.paint(torso, p.top)
  if p.pattern == "hstripes":
    period = 0.06 * u
    c.paint(torso & (((c.yy - y_sh) % period) < period * 0.45), p.accent)
  elif p.pattern == "vstripes" and not side:
    period = 0.07 * u * wf
    c.paint(torso & (((c.xx - cx + 4 * period) % period) < period * 0.4), p.accent)
  elif p.pattern == "logo" and view == "front":
    c.paint(c.rect(cx - 0.05 * u, cx + 0.05 * u, y_sh + 0.06 * u, y_sh + 0.15 * u), p.accent)
  elif p.pattern == "twotone":
    c.paint(torso & (c.yy >= (y_sh + y_hip) / 2), p.accent)
  if p.bag == "backpack":
    if view == "back":
      c.paint(c.rect(cx - shoulder * 0.8, cx + shoulder * 0.8, y_sh + 0.04 * u, y_hip - 0.04 * u),
              p.bag_colour)
    elif view == "side":
      c.paint(c.rect(cx - shoulder * 2.1, cx - shoulder * 0.9, y_sh + 0.03 * u, y_hip - 0.06 * u),
              p.bag_colour)
    else:  # straps
      for sx in (cx - shoulder * 0.55, cx + shoulder * 0.55):
        c.paint(c.rect(sx - 0.012 * u, sx + 0.012 * u, y_sh, y_sh + 0.2 * u), p.bag_colour)
  elif p.bag == "handbag":
    bx = cx + (shoulder + 0.06 * u) * (1.0 if view != "back" else -1.0)
    c.paint(c.rect(bx - 0.05 * u, bx + 0.05 * u, y_hip - 0.1 * u, y_hip + 0.04 * u), p.bag_colour)
    c.paint(c.rect(bx - 0.008 * u, bx + 0.008 * u, y_sh + 0.02 * u, y_hip - 0.1 * u), p.bag_colour)
  # Neck and head.
  c.paint(c.rect(cx - 0.025 * u, cx + 0.025 * u, y_neck - 0.02 * u, y_sh + 0.01 * u), p.skin)
  rx, ry = 0.06 * u, 0.072 * u
  if p.long_hair:
    c.paint(c.rect(cx - rx * 1.05, cx + rx * 1.05, y_head, y_sh + 0.08 * u)
            & ~(torso if view == "front" else np.zeros_like(torso)), p.hair)
  head = c.ellipse(cx, y_head, rx, ry)
  if view == "back":
    c.paint(head, p.hair)
  else:
    c.paint(head, p.skin)
    hair_line = y_head - 0.2 * ry if view == "front" else y_head + 0.2 * ry
    hair = head & (c.yy < hair_line)
    if side:
      hair |= head & (c.xx < cx - 0.3 * rx)
    c.paint(hair, p.hair)
  if p.hat is not None:
    c.paint(c.ellipse(cx, y_head - 0.5 * ry, rx * 1.1, ry * 0.6) & (c.yy < y_head - 0.25 * ry),
            p.hat)


def _occlude(c: _Canvas, cam: _Camera, rng: np.random.Generator, kind: Optional[str] = None):
  kind = kind or cam.occluder
  col = np.clip(cam.occluder_colour * rng.uniform(0.85, 1.15), 0, 1)
  if kind == "pole":
    x = rng.uniform(0.15, 0.85) * c.w
    half = rng.uniform(0.06, 0.12) * c.w
    c.paint(c.rect(x - half, x + half, 0, c.h), col)
  elif kind == "low":
    c.paint(c.rect(0, c.w, c.h * rng.uniform(0.68, 0.8), c.h), col)
  else:
    left = rng.random() < 0.5
    edge = rng.uniform(0.22, 0.35) * c.w
    c.paint(c.ellipse(-0.05 * c.w if left else 1.05 * c.w, c.h * 0.55, edge, c.h * 0.45), col)


def _finish(canvas: _Canvas, cam: _Camera, rng: np.random.Generator, size: tuple[int, int],
            flip: bool) -> bytes:
  """Downsample, apply the camera's look, encode as JPEG."""
  h, w = size
  img = Image.fromarray(np.round(np.clip(canvas.img, 0, 1) * 255).astype(np.uint8))
  img = img.resize((w, h), Image.BILINEAR, reducing_gap=None)
  if flip:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  if cam.blur > 0:
    img = img.filter(ImageFilter.GaussianBlur(cam.blur))
  x = np.asarray(img, np.float32) / 255.0
  x = np.power(x, cam.gamma) * cam.gain * cam.brightness * rng.uniform(0.92, 1.08)
  x = x * 255.0 + rng.normal(0.0, cam.noise, x.shape)
  out = Image.fromarray(np.round(np.clip(x, 0, 255)).astype(np.uint8))
  buf = io.BytesIO()
  out.save(buf, format="JPEG", quality=cam.quality)
  return buf.getvalue()


def _render_person(p: _Person, cam: _Camera, rng: np.random.Generator, size, ss: int) -> bytes:
  c = _Canvas(size[0] * ss, size[1] * ss)
  _background(c, cam, rng)
  view = _VIEWS[rng.choice(3, p=cam.views)]
  fh = c.h * cam.scale * p.height * rng.uniform(0.94, 1.06)
  top = (c.h - fh) * rng.uniform(0.25, 0.75)
  cx = c.w * (0.5 + rng.uniform(-0.08, 0.08))
  _figure(c, p, view, cx=cx, top=top, fh=fh, stride=float(rng.uniform(-1, 1)))
  if rng.random() < cam.occlusion:
    _occlude(c, cam, rng)
  return _finish(c, cam, rng, size, flip=bool(rng.random() < 0.5))


def _render_distractor(cam: _Camera, rng: np.random.Generator, size, ss: int,
                       junk: bool) -> bytes:
  """pid 0: a badly framed stranger (too big, cut off, off-centre); pid -1: mostly background."""
  c = _Canvas(size[0] * ss, size[1] * ss)
  _background(c, cam, rng)
  if junk:
    if rng.random() < 0.5:
      _occlude(c, cam, rng, kind=("pole", "low", "side")[rng.integers(3)])
  else:
    stranger = _make_person(rng)
    fh = c.h * rng.uniform(1.3, 2.2)
    top = -rng.uniform(0.0, 0.6) * fh
    cx = c.w * rng.uniform(0.1, 0.9)
    _figure(c, stranger, _VIEWS[rng.integers(3)], cx=cx, top=top, fh=fh,
            stride=float(rng.uniform(-1, 1)))
  return _finish(c, cam, rng, size, flip=False)


def _settings(**kw) -> dict:
  kw["format"] = _FORMAT
  return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def write_synthetic_market(root: str, *, num_train_ids: int = 40, num_test_ids: int = 30,
                           cams: int = 6, images_per_id_cam: int = 4,
                           cams_per_id: Sequence[int] = (2, 4), num_distractors: int = 12,
                           num_junk: int = 6, size: Sequence[int] = (64, 32), seed: int = 0,
                           supersample: int = 2, overwrite: bool = False) -> str:
  """Writes the synthetic Market-1501 tree under `root` and returns the dataset folder.

  Either `root` or the returned folder can be passed to `read_market1501`.

  Args:
    root: parent folder; the set goes to `<root>/Market-1501-v15.09.15`.
    num_train_ids / num_test_ids: identities of the train split and of query/gallery.
    cams: cameras (1..6, Market's range); each identity is seen by `cams_per_id`
      (an inclusive [lo, hi] range, lo >= 2) of them.
    images_per_id_cam: images of an identity per camera that sees it.
    num_distractors / num_junk: gallery images with pid 0 and pid -1.
    size: (H, W) of the images.
    seed: everything is a function of the arguments.
    supersample: figures are drawn at this factor and downsampled (anti-aliasing).
    overwrite: rebuild even if a tree with the same settings exists.

  A folder that exists without our manifest is never touched (FileExistsError).
  """
  if not 1 <= cams <= 6:
    raise ValueError(f"Market-1501 names allow cameras 1..6; got cams={cams}")
  lo, hi = (int(v) for v in cams_per_id)
  if not 2 <= lo <= hi <= cams:
    raise ValueError(f"cams_per_id={cams_per_id} must satisfy 2 <= lo <= hi <= cams={cams}")
  if num_train_ids < 1 or num_test_ids < 1 or images_per_id_cam < 1:
    raise ValueError("need at least one train identity, one test identity and one image each")
  if num_train_ids + num_test_ids > 1500:
    raise ValueError("Market-1501 identities run 1..1501")
  h, w = (int(s) for s in size)
  settings = _settings(num_train_ids=num_train_ids, num_test_ids=num_test_ids, cams=cams,
                       images_per_id_cam=images_per_id_cam, cams_per_id=(lo, hi),
                       num_distractors=num_distractors, num_junk=num_junk, size=(h, w),
                       seed=seed, supersample=supersample)
  base = os.path.join(os.path.expanduser(os.fspath(root)), DATASET_DIR)
  manifest_path = os.path.join(base, MANIFEST)
  if os.path.exists(base):
    if not os.path.isfile(manifest_path):
      raise FileExistsError(f"{base} exists and was not written by write_synthetic_market; "
                            "refusing to overwrite it")
    with open(manifest_path) as f:
      old = json.load(f)
    if old.get("settings") == settings and not overwrite:
      return base

  rng = np.random.default_rng([seed, 0x52454944])
  cameras = [_make_camera(np.random.default_rng([seed, 1, k])) for k in range(cams)]
  # Interleaved identity numbers as in Market (train and test ids alternate irregularly).
  ids = np.sort(rng.choice(np.arange(1, 1502), num_train_ids + num_test_ids, replace=False))
  is_train = np.zeros(ids.size, bool)
  is_train[rng.choice(ids.size, num_train_ids, replace=False)] = True
  files = {"train": [], "query": [], "gallery": []}  # (name, bytes)
  frame = np.zeros(cams, np.int64)

  def name(pid: int, cam: int, r: np.random.Generator) -> str:
    frame[cam] += int(r.integers(20, 200))
    seq = int(r.integers(1, 7))
    bbox = int(r.integers(1, 9))
    pid_s = "-1" if pid < 0 else f"{pid:04d}"
    return f"{pid_s}_c{cam + 1}s{seq}_{frame[cam]:06d}_{bbox:02d}.jpg"

  counts = {"train": 0, "query": 0, "gallery": 0, "distractors": 0, "junk": 0}
  for pid, train in zip(ids.tolist(), is_train.tolist()):
    prng = np.random.default_rng([seed, 2, pid])  # per identity: stable under other changes
    person = _make_person(prng)
    n_cams = int(prng.integers(lo, hi + 1))
    id_cams = np.sort(prng.choice(cams, n_cams, replace=False)).tolist()
    if train:
      query_cams: set = set()
    else:
      # One query per camera for some of its cameras; keep a camera out of the queries when a
      # single image per camera would otherwise leave a query without a cross-camera match.
      n_q = int(prng.integers(1, n_cams + (1 if images_per_id_cam > 1 else 0)))
      query_cams = set(prng.choice(id_cams, min(n_q, n_cams), replace=False).tolist())
    for cam in id_cams:
      for k in range(images_per_id_cam):
        data = _render_person(person, cameras[cam], prng, (h, w), supersample)
        split = "train" if train else ("query" if k == 0 and cam in query_cams else "gallery")
        files[split].append((name(pid, cam, prng), data))
        counts[split] += 1
  for i in range(num_distractors + num_junk):
    junk = i >= num_distractors
    drng = np.random.default_rng([seed, 3, i])
    cam = int(drng.integers(cams))
    data = _render_distractor(cameras[cam], drng, (h, w), supersample, junk)
    files["gallery"].append((name(-1 if junk else 0, cam, drng), data))
    counts["junk" if junk else "distractors"] += 1

  os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic_market_", dir=os.path.dirname(base) or ".")
  try:
    for split, entries in files.items():
      d = os.path.join(tmp, SPLIT_DIRS[split])
      os.makedirs(d)
      for fname, data in entries:
        path = os.path.join(d, fname)
        if os.path.exists(path):
          raise RuntimeError(f"duplicate synthetic file name {fname}")
        with open(path, "wb") as f:
          f.write(data)
    manifest = {"settings": settings, "counts": counts,
                "train_ids": ids[is_train].tolist(), "test_ids": ids[~is_train].tolist()}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(base):
      shutil.rmtree(base)  # ours (it has a manifest) with other settings
    os.replace(tmp, base)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return base


def read_manifest(path: str) -> dict:
  """The manifest of a tree written by `write_synthetic_market` (root or dataset folder)."""
  path = os.fspath(path)
  for cand in (os.path.join(path, MANIFEST), os.path.join(path, DATASET_DIR, MANIFEST)):
    if os.path.isfile(cand):
      with open(cand) as f:
        return json.load(f)
  raise FileNotFoundError(f"no {MANIFEST} under {path}")
