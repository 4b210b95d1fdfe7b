"""ReID transforms: parity with torchvision for the deterministic steps, erasing statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from jaxprompt.clipreid import transforms as T

torch = pytest.importorskip("torch")
tvT = pytest.importorskip("torchvision.transforms")
tvF = pytest.importorskip("torchvision.transforms.functional")


def _img(h: int = 97, w: int = 43, seed: int = 0) -> Image.Image:
  rng = np.random.default_rng(seed)
  # A smooth ramp plus noise, so resampling filters see both edges and gradients.
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([yy * 255 / h, xx * 255 / w, (yy + xx) * 127 / (h + w)], -1)
  arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
  return Image.fromarray(arr)


def _chw(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (1, 2, 0))


def _tv_tensor(pil: Image.Image, mean, std) -> np.ndarray:
  t = tvT.Normalize(mean, std)(tvT.ToTensor()(pil))
  return _chw(t.numpy())


@pytest.mark.parametrize("interp,pil_mode", [("bicubic", Image.Resampling.BICUBIC),
                                             ("bilinear", Image.Resampling.BILINEAR)])
def test_resize_matches_torchvision(interp, pil_mode):
  img = _img()
  mode = getattr(tvT.InterpolationMode, interp.upper())
  ref = np.asarray(tvT.Resize((256, 128), interpolation=mode)(img))
  ours = T.resize(img, (256, 128), pil_mode)
  assert ours.shape == (256, 128, 3)
  np.testing.assert_array_equal(ours, ref)


def test_normalise_matches_torchvision():
  img = _img()
  for mean, std in [(T.VIT_MEAN, T.VIT_STD), (T.IMAGENET_MEAN, T.IMAGENET_STD)]:
    ours = T.to_float_normalize(np.asarray(img), mean, std)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _tv_tensor(img, mean, std), atol=1e-6, rtol=0)


def test_pad_crop_flip_match_torchvision():
  img = _img(40, 24)
  arr = np.asarray(img)
  np.testing.assert_array_equal(T.zero_pad(arr, 10), np.asarray(tvT.Pad(10)(img)))
  np.testing.assert_array_equal(T.hflip(arr), np.asarray(tvF.hflip(img)))
  padded = tvT.Pad(10)(img)
  for top, left in [(0, 0), (20, 20), (7, 13)]:
    ref = np.asarray(tvF.crop(padded, top, left, 40, 24))
    np.testing.assert_array_equal(T.crop(T.zero_pad(arr, 10), top, left, 40, 24), ref)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_train_transform_matches_torchvision_pipeline(seed):
  img, size = _img(), (256, 128)
  mean, std = T.IMAGENET_MEAN, T.IMAGENET_STD
  ours = T.reid_train_transform(img, np.random.default_rng(seed), size, mean, std, erase_p=0.0)
  # Replay the documented draw order (flip, crop top, crop left) through torchvision.
  rng = np.random.default_rng(seed)
  flip = rng.random() < 0.5
  top, left = int(rng.integers(0, 21)), int(rng.integers(0, 21))
  pil = tvT.Resize(size, interpolation=tvT.InterpolationMode.BICUBIC)(img)
  if flip:
    pil = tvF.hflip(pil)
  pil = tvF.crop(tvT.Pad(10)(pil), top, left, *size)
  assert ours.shape == (256, 128, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, _tv_tensor(pil, mean, std), atol=1e-6, rtol=0)


def test_train_transform_random_choices_cover_range():
  img = _img()
  outs = {T.reid_train_transform(img, np.random.default_rng(s), erase_p=0.0).tobytes()
          for s in range(40)}
  assert len(outs) > 30  # flips and 21x21 crop offsets give distinct outputs


def test_test_transform_matches_torchvision():
  img = _img()
  ref = tvT.Compose([tvT.Resize((256, 128)), tvT.ToTensor(),
                     tvT.Normalize(T.VIT_MEAN, T.VIT_STD)])(img)
  ours = T.reid_test_transform(img, (256, 128), T.VIT_MEAN, T.VIT_STD)
  np.testing.assert_allclose(ours, _chw(ref.numpy()), atol=1e-6, rtol=0)


def test_same_seed_same_output():
  img = _img()
  a = T.reid_train_transform(img, np.random.default_rng(123))
  b = T.reid_train_transform(img, np.random.default_rng(123))
  c = T.reid_train_transform(img, np.random.default_rng(124))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def _erased_boxes(images: np.ndarray, fill: float) -> list:
  boxes = []
  for x in images:
    mask = np.any(x != fill, axis=-1)
    if not mask.any():
      boxes.append(None)
      continue
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    boxes.append((rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
  return boxes


def test_random_erasing_statistics_and_timm_agreement():
  h, w, n, fill = 128, 64, 2000, 1000.0
  rng = np.random.default_rng(0)
  base = np.full((h, w, 3), fill, np.float32)
  ours = np.stack([T.random_erasing(base, rng, p=0.5) for _ in range(n)])
  boxes = _erased_boxes(ours, fill)
  got = [b for b in boxes if b is not None]
  frac = len(got) / n
  assert abs(frac - 0.5) < 0.05
  # Bounds of timm's rule (area 2%..33%, aspect 0.3..1/0.3), widened by the rounding of h, w.
  for top, left, bh, bw in got:
    assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
    area = bh * bw / (h * w)
    assert 0.02 * 0.85 <= area <= (1 / 3) * 1.1, area
    assert 0.3 * 0.8 <= bh / bw <= (1 / 0.3) * 1.25
  # Fill values: per-pixel N(0, 1), independent across channels.
  vals = np.concatenate([ours[i, b[0]:b[0] + b[2], b[1]:b[1] + b[3]].reshape(-1, 3)
                         for i, b in enumerate(boxes) if b is not None])
  assert abs(vals.mean()) < 0.01 and abs(vals.std() - 1) < 0.01
  assert abs(np.corrcoef(vals[:, 0], vals[:, 1])[0, 1]) < 0.01
  # The same statistics from timm's RandomErasing itself.
  timm_re = pytest.importorskip("timm.data.random_erasing")
  import random
  random.seed(0)
  torch.manual_seed(0)
  eraser = timm_re.RandomErasing(probability=0.5, mode="pixel", max_count=1, device="cpu")
  ref = np.stack([_chw(eraser(torch.full((3, h, w), fill)).numpy()) for _ in range(n)])
  ref_got = [b for b in _erased_boxes(ref, fill) if b is not None]
  assert abs(len(ref_got) / n - frac) < 0.07
  area = lambda bs: np.array([b[2] * b[3] / (h * w) for b in bs])
  log_aspect = lambda bs: np.array([math.log(b[2] / b[3]) for b in bs])
  assert abs(area(got).mean() - area(ref_got).mean()) < 0.015
  assert abs(np.median(area(got)) - np.median(area(ref_got))) < 0.02
  assert abs(log_aspect(got).mean() - log_aspect(ref_got).mean()) < 0.1
  assert abs(log_aspect(got).std() - log_aspect(ref_got).std()) < 0.1


def test_erasing_box_probability_zero_and_one():
  rng = np.random.default_rng(0)
  assert all(T.erasing_box(rng, 256, 128, p=0.0) is None for _ in range(100))
  boxes = [T.erasing_box(rng, 256, 128, p=1.0) for _ in range(200)]
  assert all(b is not None for b in boxes)  # 10 attempts essentially always succeed at 256x128


def test_norm_constants():
  assert T.norm_constants("ViT-B-16") == (T.VIT_MEAN, T.VIT_STD)
  assert T.norm_constants("ViT-B/16") == (T.VIT_MEAN, T.VIT_STD)
  assert T.norm_constants("RN50") == (T.IMAGENET_MEAN, T.IMAGENET_STD)
  with pytest.raises(ValueError, match="foo"):
    T.norm_constants("foo")


def test_load_image_errors_name_the_path(tmp_path):
  missing = tmp_path / "nope.jpg"
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    T.load_image(str(missing))
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(OSError, match="broken.jpg"):
    T.load_image(str(bad))
  trunc = tmp_path / "trunc.jpg"
  _img(64, 32).save(tmp_path / "full.jpg", quality=90)
  trunc.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
  with pytest.raises(OSError, match="trunc.jpg"):
    T.load_image(str(trunc))
  gray = tmp_path / "gray.png"
  Image.fromarray(np.zeros((5, 4), np.uint8)).save(gray)
  im = T.load_image(str(gray))
  assert im.mode == "RGB" and im.size == (4, 5)


def test_make_reid_decode(tmp_path):
  from jaxprompt.clipreid.data import ReIDRecord
  p = tmp_path / "0001_c1s1_000001_00.jpg"
  _img(64, 32).save(p)
  rec = ReIDRecord(str(p), 3, 1, -1, 1)
  out = T.make_reid_decode(True)(rec, np.random.default_rng(0))
  assert out["image"].shape == (256, 128, 3) and out["image"].dtype == np.float32
  assert int(out["pid"]) == 3 and int(out["camid"]) == 1 and int(out["viewid"]) == -1
  assert out["pid"].dtype == np.int32 and out["pid"].shape == ()
  test = T.make_reid_decode(False, size=(224, 224))(rec, np.random.default_rng(0))
  assert test["image"].shape == (224, 224, 3)
  expect = T.reid_test_transform(Image.open(p).convert("RGB"), (224, 224))
  np.testing.assert_array_equal(test["image"], expect)
