"""Benchmark: training data path, jaxprompt's Loader against torch's DataLoader.

Writes JPEGs of the datasets' real sizes (Market-1501 crops are 64x128; Places-LT's
images are 256x256 in Places365-standard), then reads them with the training
transforms through

* jaxprompt's `Loader` (`data/loader.py`) with `make_reid_decode(train=True)` (bicubic
  resize to 256x128, flip, pad 10, crop, normalise, random erasing) or LPT's
  `make_lt_decode(train=True)` (RandomResizedCrop 224, flip, normalise);
* torch's `DataLoader` with the torchvision equivalents (Resize bicubic, RandomHorizontalFlip,
  Pad, RandomCrop, ToTensor, Normalize, RandomErasing; RandomResizedCrop, ...), the same
  worker count, the same batch size.

Both sides decode the same files, rounds interleaved; images/s are medians.

  python benchmarks/bench_data.py --recipe reid --workers 2 [--backend thread|process]
  python benchmarks/bench_data.py --recipe lpt --workers 2
  python benchmarks/bench_data.py --quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

SIZES = {"reid": (128, 64), "lpt": (256, 256)}  # (H, W) of the stored JPEGs


def write_jpegs(folder: str, n: int, hw: tuple[int, int], seed: int = 0) -> list[str]:
  """`n` JPEGs (quality 90) with smooth random content, like natural photos."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(seed)
  paths = []
  h, w = hw
  for i in range(n):
    small = rs.randint(0, 256, (max(2, h // 8), max(2, w // 8), 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    noise = rs.randint(-20, 21, (h, w, 3))
    arr = np.clip(np.asarray(img, np.int32) + noise, 0, 255).astype(np.uint8)
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(arr).save(path, quality=90)
    paths.append(path)
  return paths


def ours(recipe: str, paths: list[str], batch: int, workers: int, backend: str):
  from jaxprompt.data import loader as loader_lib  # pylint: disable=import-outside-toplevel
  if recipe == "reid":
    from jaxprompt.clipreid.data import ReIDRecord  # pylint: disable=import-outside-toplevel
    from jaxprompt.clipreid.transforms import make_reid_decode  # pylint: disable=import-outside-toplevel
    records = [ReIDRecord(p, i % 100, i % 6) for i, p in enumerate(paths)]
    decode = make_reid_decode(True, (256, 128))
  else:
    from jaxprompt.lpt.data import LTRecord  # pylint: disable=import-outside-toplevel
    from jaxprompt.lpt.transforms import make_lt_decode  # pylint: disable=import-outside-toplevel
    records = [LTRecord(p, i % 100) for i, p in enumerate(paths)]
    decode = make_lt_decode(True, 224)
  kw = {"backend": backend} if backend != "thread" else {}
  ld = loader_lib.Loader(records, decode, loader_lib.ShuffleSampler(len(records)), batch,
                         workers=workers, process_index=0, process_count=1, **kw)
  state = {"epoch": 0}

  def epoch() -> int:
    n = 0
    for b in ld.iterate(state["epoch"]):
      n += len(b["image"])
    state["epoch"] += 1
    return n
  return epoch


def torch_side(recipe: str, paths: list[str], batch: int, workers: int):
  import torch  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from torchvision import transforms as T  # pylint: disable=import-outside-toplevel
  if recipe == "reid":
    tf = T.Compose([T.Resize((256, 128), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop((256, 128)),
                    T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                    T.RandomErasing(0.5, value="random")])
  else:
    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

  class DS(torch.utils.data.Dataset):
    def __len__(self):
      return len(paths)

    def __getitem__(self, i):
      with Image.open(paths[i]) as im:
        return tf(im.convert("RGB")), i % 100

  dl = torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, num_workers=workers,
                                   drop_last=True, persistent_workers=workers > 0)

  def epoch() -> int:
    n = 0
    for x, _ in dl:
      n += x.shape[0]
    return n
  return epoch


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--recipe", default="reid", choices=["reid", "lpt"])
  ap.add_argument("--images", type=int, default=512)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--backend", default="thread", choices=["thread", "process"])
  ap.add_argument("--rounds", type=int, default=3)
  common.add_common_args(ap)
  args = ap.parse_args(argv)
  common.set_threads(1)  # the decoding threads/processes are the parallelism here
  n_img = 32 if args.quick else args.images
  batch = 8 if args.quick else args.batch
  rounds = 1 if args.quick else args.rounds
  with tempfile.TemporaryDirectory() as tmp:
    paths = write_jpegs(tmp, n_img, SIZES[args.recipe])
    cands = {"jaxprompt": ours(args.recipe, paths, batch, args.workers, args.backend),
             "torch": torch_side(args.recipe, paths, batch, args.workers)}
    counts = {k: fn() for k, fn in cands.items()}  # warm-up: file cache, worker start
    times = {k: [] for k in cands}
    for _ in range(rounds):
      for k, fn in cands.items():
        t = time.perf_counter()
        counts[k] = fn()
        times[k].append(time.perf_counter() - t)
    # CPU seconds per image in this process (no workers): robust to other jobs on the
    # machine, and what the per-core scaling estimate needs.
    cpu = {}
    for k, fn in (("jaxprompt", ours(args.recipe, paths, batch, 0, "thread")),
                  ("torch", torch_side(args.recipe, paths, batch, 0))):
      c = time.process_time()
      n = fn()
      cpu[k] = n / max(time.process_time() - c, 1e-9)
  res = common.ratio_summary(times, "jaxprompt", "torch")
  res.update(jax_img_per_cpu_s=cpu["jaxprompt"], torch_img_per_cpu_s=cpu["torch"],
             jax_16core_estimate=16 * cpu["jaxprompt"])
  res.update(
      bench="data", recipe=args.recipe, workers=args.workers, backend=args.backend,
      batch=batch, images=n_img, rounds=rounds, quick=args.quick,
      stored_hw=list(SIZES[args.recipe]),
      jax_img_s=counts["jaxprompt"] / statistics.median(times["jaxprompt"]),
      torch_img_s=counts["torch"] / statistics.median(times["torch"]),
      command="python benchmarks/bench_data.py " + " ".join(sys.argv[1:] if argv is None
                                                            else argv))
  res["jax_img_s_per_worker"] = res["jax_img_s"] / max(1, args.workers)
  print(f"{args.recipe} data path, {args.workers} workers ({args.backend}): jaxprompt "
        f"{res['jax_img_s']:.0f} img/s, torch {res['torch_img_s']:.0f} img/s, ratio "
        f"{res['ratio']:.2f}x ({res['ratio_min']:.2f}..{res['ratio_max']:.2f})")
  common.emit(res, args.json)
  return res


if __name__ == "__main__":
  main()
