"""`make bench`: runs every benchmark and writes BENCHMARKS.md.

  python benchmarks/run_all.py                 # full sizes (under 15 minutes on 2 cores)
  python benchmarks/run_all.py --quick         # every script in its smoke-test mode
  python benchmarks/run_all.py --only train_step --out /tmp/B.md

Each row runs as its own process (its exact command is in the table); results come
back as JSON lines. BENCHMARKS.md is the generated table followed by the hand-written
profile notes of `benchmarks/notes.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# (group, command). Sizes are chosen so that the whole list stays under 15 minutes on
# this 2-core machine: two rounds per step row (one for RN50 at batch 32, the slowest:
# 70 s a round), more where a round takes seconds.
FULL = [
    ("train_step", "bench_train_step.py --model vit_b16 --batch 8 --rounds 2"),
    ("train_step", "bench_train_step.py --model vit_b16 --batch 32 --rounds 2"),
    ("train_step", "bench_train_step.py --model rn50 --batch 8 --rounds 2"),
    ("train_step", "bench_train_step.py --model rn50 --batch 32 --rounds 1"),
    ("train_step", "bench_train_step.py --model lpt --batch 4 --rounds 2"),
    ("train_step", "bench_train_step.py --model coop --batch 32 --rounds 2"),
    ("train_step", "bench_train_step.py --model cocoop --batch 1 --rounds 3"),
    ("data", "bench_data.py --recipe reid --workers 1 --images 256"),
    ("data", "bench_data.py --recipe reid --workers 2 --images 256"),
    ("data", "bench_data.py --recipe reid --workers 2 --images 256 --backend process"),
    ("data", "bench_data.py --recipe lpt --workers 1 --images 128"),
    ("data", "bench_data.py --recipe lpt --workers 2 --images 128"),
    ("data", "bench_data.py --recipe lpt --workers 2 --images 128 --backend process"),
    ("eval", "bench_reid_eval.py --repeats 2"),
    ("eval", "bench_lpt_inference.py --repeats 3"),
]
# The smoke test: every script at tiny sizes; the five step pairs share one process (its
# imports of torch, open_clip and timm are most of a quick row's time).
QUICK = [
    ("train_step", "bench_train_step.py --quick --model vit_b16,rn50,lpt,coop,cocoop --batch 8"),
    ("data", "bench_data.py --quick --recipe reid --workers 2"),
    ("data", "bench_data.py --quick --recipe lpt --workers 2 --backend process"),
    ("eval", "bench_reid_eval.py --quick"),
    ("eval", "bench_lpt_inference.py --width 64 --heads 1 --depth 2 --image 32 --batch 2 "
             "--repeats 1"),
]

# Lines of the two older text-output benchmarks that carry their ratio.
_TEXT_RATIO = {"bench_reid_eval.py": r"speed-up\s+([\d.]+)\s*x",
               "bench_lpt_inference.py": r"fused / naive = ([\d.]+)"}


def run_row(cmd: str, json_path: str) -> tuple[list[dict], str, float]:
  """Runs one command; its results (one per JSON line it wrote), its output, its wall time."""
  script = cmd.split()[0]
  argv = [sys.executable, "-W", "ignore", os.path.join(HERE, script), *shlex.split(cmd)[1:]]
  if script in ("bench_train_step.py", "bench_data.py"):
    argv += ["--json", json_path]
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
  t = time.perf_counter()
  proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
  wall = time.perf_counter() - t
  out = proc.stdout + proc.stderr
  if proc.returncode:
    raise SystemExit(f"benchmark failed: python benchmarks/{cmd}\n{out[-3000:]}")
  if script in _TEXT_RATIO:
    m = re.search(_TEXT_RATIO[script], proc.stdout)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    return [{"bench": script, "text": "\n".join(lines[-8:]),
             "command": f"python benchmarks/{cmd}", "machine": common.machine(),
             "ratio": float(m.group(1)) if m else float("nan")}], out, wall
  with open(json_path) as f:
    results = [json.loads(l) for l in f.read().strip().splitlines()]
  return results, out, wall


def row_count(cmd: str) -> int:
  """Table rows `cmd` gives: one per model of a `bench_train_step.py --model a,b,...`."""
  args = shlex.split(cmd)
  if args[0] == "bench_train_step.py" and "--model" in args:
    return len(args[args.index("--model") + 1].split(","))
  return 1


def _row(group: str, cmd: str, r: dict, wall: float) -> str:
  """One table row; `wall` NaN for the later rows of a command that timed several steps."""
  cmd = re.sub(r" --json \S+", "", cmd)  # run_all's own result file, not part of the row
  c = f"`python benchmarks/{cmd}`"
  spread = (f" ({r['ratio_min']:.2f}..{r['ratio_max']:.2f})" if "ratio_min" in r else "")
  if group == "train_step":
    what = (f"{r['model']} step, batch {r['batch']} ({r['images']} img), {r['precision']}")
    return (f"| {what} | {r['jaxprompt_s']:.2f} s | {r['torch_s']:.2f} s | "
            f"**{r['ratio']:.2f}x**{spread} | {r['gflop']:.0f} GFLOP; of same-run matmul rate: "
            f"jax {r['jax_frac_of_matmul']:.2f} ({r['jax_matmul_gflops']:.0f} GFLOP/s), torch "
            f"{r['torch_frac_of_matmul']:.2f} ({r['torch_matmul_gflops']:.0f} GFLOP/s) | "
            f"{c} | {_wall(wall)} |")
  if group == "data":
    what = (f"{r['recipe']} train data, {r['workers']} worker(s), {r['backend']} "
            f"({r['stored_hw'][1]}x{r['stored_hw'][0]} JPEGs)")
    return (f"| {what} | {r['jax_img_s']:.0f} img/s | {r['torch_img_s']:.0f} img/s | "
            f"**{r['ratio']:.2f}x**{spread} | {r['jax_img_s_per_worker']:.0f} img/s per worker"
            + (f"; per CPU-second: jax {r['jax_img_per_cpu_s']:.0f}, torch "
               f"{r['torch_img_per_cpu_s']:.0f} img; 16-core estimate "
               f"{r['jax_16core_estimate']:.0f} img/s" if "jax_img_per_cpu_s" in r else "")
            + " | "
            f"{c} | {_wall(wall)} |")
  name = ("Market-size ReID evaluation vs per-query loop" if r["bench"] == "bench_reid_eval.py"
          else "LPT fused inference vs two passes (time ratio, lower is better)")
  detail = "<br>".join(r["text"].splitlines()[-4:]).replace("|", "/")
  return f"| {name} | | | **{r['ratio']:.2f}x** | {detail} | {c} | {_wall(wall)} |"


def _wall(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds == seconds else "(same run as the row above)"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--only", default="", help="run only this group (train_step, data, eval)")
  ap.add_argument("--rows", default="", help="comma-separated row numbers (1-based) to run; "
                  "0 runs none (only the --extra-json rows)")
  ap.add_argument("--extra-json", default="",
                  help="JSON lines of rows measured earlier by the same scripts, added to the "
                       "table (marked as such)")
  ap.add_argument("--keep-json", default="", help="append each row's result to this file")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"))
  args = ap.parse_args(argv)
  table = QUICK if args.quick else FULL
  keep = {int(i) for i in args.rows.split(",") if i} if args.rows else set()
  rows = [r for i, r in enumerate(table, 1)
          if (not args.only or r[0] == args.only) and (not keep or i in keep)]
  m = common.machine()
  lines = []
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for i, (group, cmd) in enumerate(rows):
      print(f"[{i + 1}/{len(rows)}] python benchmarks/{cmd}", flush=True)
      results, _, wall = run_row(cmd, os.path.join(tmp, f"{i}.json"))
      for result in results:  # a command timing several steps gives a row for each
        line = _row(group, cmd, result, wall if result is results[0] else float("nan"))
        print("   " + line, flush=True)
        lines.append(line)
        if args.keep_json:
          with open(args.keep_json, "a") as f:
            f.write(json.dumps({**result, "wall_s": wall}, sort_keys=True) + "\n")
  total = time.perf_counter() - t0
  n_now, n_earlier = len(lines), 0
  if args.extra_json:
    with open(args.extra_json) as f:
      for raw in f:
        if raw.strip().startswith("{"):
          r = json.loads(raw)
          cmd = r["command"].replace("python benchmarks/", "", 1)
          group = r["bench"] if r["bench"] in ("train_step", "data") else "eval"
          wall = r.get("wall_s", float("nan"))
          line = _row(group, cmd, r, wall)
          took = f"{wall:.0f} s" if wall == wall else "n/a"
          lines.append(line.rsplit("|", 2)[0] + f"| {took}, run {r['machine']['date']} |")
          n_earlier += 1
  how = (f"Generated by `make bench` (`python benchmarks/run_all.py{' --quick' if args.quick else ''}`)"
         if n_now else "Assembled by `python benchmarks/run_all.py --rows 0 --extra-json FILE` "
         "from the JSON results that runs of the listed commands wrote,")
  head = [
      "# Benchmarks",
      "",
      f"{how} on {m['date']}: CPU **{m['cpu']}**, {m['cores']} cores, no accelerator; "
      f"{n_now} row(s) run now in {total / 60:.1f} min"
      + (f", {n_earlier} row(s) from separate runs of the same commands (their wall time and "
         "date in the last column)" if n_earlier else "")
      + ". **No GPU figures were taken** (no GPU was available); `benchmarks/gpu.sh` is "
      "ready for one.",
      "",
      "Ratios are speed-ups of jaxprompt over the reference (reference time / our time; "
      "above 1 = jaxprompt faster), from medians of interleaved rounds (A B A B ... in one "
      "process, same threads); in brackets the min..max of the per-round ratios. The machine "
      "is shared, so absolute times vary by 2x or more between runs; the ratios much less.",
      "",
      "| Benchmark | jaxprompt | reference | ratio | details | command | wall |",
      "|---|---|---|---|---|---|---|",
  ]
  notes_path = os.path.join(HERE, "notes.md")
  notes = open(notes_path).read() if os.path.exists(notes_path) else ""
  with open(args.out, "w") as f:
    f.write("\n".join(head + lines) + "\n\n" + notes)
  print(f"wrote {args.out} ({total / 60:.1f} min)")


if __name__ == "__main__":
  main()
