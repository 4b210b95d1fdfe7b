"""The default job's paths and its final report: the results table (printed, results.md),
results.json and the comparison plots, from the results files the stages wrote."""
from __future__ import annotations

import os
from typing import Optional

import jax

from jaxprompt import metrics as metrics_lib

# ============================================================================ paths


class Paths:
  """Where each part of the job lives under `workdir`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.data = os.path.join(workdir, "data")
    self.market_root = self.data  # the reader takes the parent of Market-1501-v15.09.15
    self.digits = os.path.join(self.data, "digits_lt")
    self.vit = os.path.join(self.data, "tiny_vit.npz")
    self.clipreid_untrained = os.path.join(workdir, "clipreid_untrained")
    self.untrained_params = os.path.join(self.clipreid_untrained, "untrained_params.npz")
    self.clipreid = os.path.join(workdir, "clipreid")
    self.lpt = os.path.join(workdir, "lpt")
    self.linear = os.path.join(workdir, "linear")
    self.coop = os.path.join(workdir, "coop")
    self.timings = os.path.join(workdir, "timings.json")


def say(msg: str) -> None:
  # Printed once, to stdout; the same text is also saved in results.md.
  if jax.process_index() == 0:
    print(msg, flush=True)


# ============================================================================ the table

REID_KEYS = ("mAP", "R1", "R5", "R10")
LT_KEYS = ("overall", "many", "medium", "few")
COOP_KEYS = ("base", "new", "H")
COOP_ROWS = (("zeroshot", "zero-shot CLIP ('a photo of a {}.')"),
             ("coop", "CoOp (4 context tokens)"),
             ("cocoop", "CoCoOp (4 tokens + Meta-Net)"))


def collect(paths: Paths) -> dict:
  """Every sub-run's results file; names the stage to run for any that is missing."""
  files = {
      "clipreid_untrained": (os.path.join(paths.clipreid_untrained, "eval", "results.json"),
                             "clipreid"),
      "clipreid": (os.path.join(paths.clipreid, "eval", "results.json"), "clipreid"),
      "linear": (os.path.join(paths.linear, "eval", "train", "results.json"), "lpt"),
      "lpt_phase1": (os.path.join(paths.lpt, "eval", "phase1", "results.json"), "lpt"),
      "lpt_phase2": (os.path.join(paths.lpt, "eval", "phase2", "results.json"), "lpt"),
      "coop": (os.path.join(paths.coop, "results.json"), "coop"),
  }
  out = {}
  for key, (path, stage) in files.items():
    res = metrics_lib.read_json(path)
    if res is None:
      raise FileNotFoundError(f"{path} is missing: run the '{stage}' stage first")
    out[key] = res
  return out


def results_table(res: dict) -> str:
  """One aligned (markdown) table: ReID rows with mAP/R1, long-tail rows with accuracies."""
  header = ["task", "model", "mAP", "R1", "R5", "overall", "many", "medium", "few", "base",
            "new", "H"]
  rows = []
  for key, name in (("clipreid_untrained", "CLIP-ReID, untrained (random init)"),
                    ("clipreid", "CLIP-ReID, stage 1 + stage 2")):
    r = res[key]
    rows.append(["ReID", name, *(f"{100 * r[k]:.1f}" for k in ("mAP", "R1", "R5")),
                 "", "", "", "", "", "", ""])
  for key, name in (("linear", "linear probe (frozen ViT)"),
                    ("lpt_phase1", "LPT phase 1 (shared prompt)"),
                    ("lpt_phase2", "LPT phase 2 (shared + group)")):
    r = res[key]
    rows.append(["LT digits", name, "", "", "", *(f"{r[k]:.1f}" for k in LT_KEYS), "", "", ""])
  for key, name in COOP_ROWS:
    r = res["coop"]["rows"][key]
    rows.append(["shapes", name, "", "", "", "", "", "", "",
                 *(f"{r[k]:.1f}" for k in COOP_KEYS)])
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  right = [False, False] + [True] * (len(header) - 2)

  def line(cells):
    return "| " + " | ".join(str(c).rjust(w) if r else str(c).ljust(w)
                             for c, w, r in zip(cells, widths, right)) + " |"

  sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2))
                       for w, r in zip(widths, right)) + "|"
  return "\n".join([line(header), sep] + [line(r) for r in rows])


def summary(res: dict) -> dict:
  """The headline numbers (percent) and the two comparisons the job is meant to show."""
  before, after = res["clipreid_untrained"], res["clipreid"]
  lin, p2 = res["linear"], res["lpt_phase2"]
  coop = res["coop"]["rows"]
  return {
      "clipreid": {"before": {k: 100 * before[k] for k in REID_KEYS},
                   "after": {k: 100 * after[k] for k in REID_KEYS},
                   "num_query": after["num_query"], "num_gallery": after["num_gallery"]},
      "longtail": {"linear": {k: lin[k] for k in LT_KEYS},
                   "lpt_phase1": {k: res["lpt_phase1"][k] for k in LT_KEYS},
                   "lpt_phase2": {k: p2[k] for k in LT_KEYS},
                   "classes_per_bucket": p2["classes_per_bucket"]},
      "coop": {key: {k: coop[key][k] for k in COOP_KEYS} for key, _ in COOP_ROWS},
      "checks": {"clipreid_map_gain": 100 * (after["mAP"] - before["mAP"]),
                 "clipreid_r1_gain": 100 * (after["R1"] - before["R1"]),
                 "lpt_few_gain_over_linear": p2["few"] - lin["few"],
                 "lpt_overall_gain_over_linear": p2["overall"] - lin["overall"],
                 "coop_base_gain_over_zeroshot": coop["coop"]["base"] - coop["zeroshot"]["base"],
                 "cocoop_base_gain_over_zeroshot":
                     coop["cocoop"]["base"] - coop["zeroshot"]["base"]},
  }


def _fmt_seconds(s: float) -> str:
  m, sec = divmod(int(round(s)), 60)
  return f"{m}m{sec:02d}s" if m else f"{sec}s"


def run_report(config, paths: Paths, timings: Optional[dict] = None) -> dict:
  """The results table (printed and saved), results.json and the comparison plots."""
  from jaxprompt.lpt import evaluate as lt_eval
  from jaxprompt.clipreid import plots
  res = collect(paths)
  table = results_table(res)
  out = summary(res)
  out["size"] = config.size
  timings = timings or metrics_lib.read_json(paths.timings) or {}
  out["seconds"] = timings
  if jax.process_index() != 0:
    return out

  cmc_path = os.path.join(paths.workdir, "cmc.png")
  plots.plot_cmc({"untrained": res["clipreid_untrained"]["cmc"],
                  "CLIP-ReID": res["clipreid"]["cmc"]}, cmc_path, ranks=20,
                 title="CMC, synthetic Market-1501")
  bucket_path = os.path.join(paths.workdir, "bucket_accuracy.png")
  lt_eval.plot_bucket_accuracy(
      {name: {k: res[key][k] / 100.0 for k in LT_KEYS}
       for key, name in (("linear", "linear probe"), ("lpt_phase1", "LPT phase 1"),
                         ("lpt_phase2", "LPT phase 2"))},
      bucket_path, title="long-tailed digits (LPT buckets)")

  total = sum(v for k, v in timings.items() if k != "report")
  buckets = res["lpt_phase2"]["classes_per_bucket"]
  notes = [
      f"ReID: synthetic Market-1501, {res['clipreid']['num_query']} queries / "
      f"{res['clipreid']['num_gallery']} gallery images, tiny random CLIP.",
      f"LT digits: {sum(buckets.values())} classes ({buckets['many']} many, "
      f"{buckets['medium']} medium, {buckets['few']} few), frozen ViT pretrained on glyphs; "
      "accuracy in %.",
      f"shapes: 24 generated colour-shape classes, 12 base (prompts trained on 8 shots each) "
      f"and 12 new, tiny CLIP pretrained on image-caption pairs; top-1 in %, chance "
      f"{res['coop']['chance']:.1f}%, seed {res['coop'].get('seed', 1)}.",
  ]
  if total:
    notes.append("time: " + ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in timings.items()
                                      if k != "report") + f" (total {_fmt_seconds(total)})")
  where = [
      f"results: {os.path.join(paths.workdir, 'results.md')} and results.json",
      f"plots: {cmc_path}, {bucket_path},",
      f"       {os.path.join(paths.clipreid, 'eval', 'ranked.png')} (ranked results),",
      f"       {os.path.join(paths.lpt, 'eval', 'phase2', 'per_class_accuracy.png')}",
      f"TensorBoard: tensorboard --logdir {paths.workdir}",
  ]
  text = "\n".join([f"jaxprompt default job (size '{config.size}')", "", table, ""]
                   + notes)
  with open(os.path.join(paths.workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  metrics_lib.write_json(os.path.join(paths.workdir, "results.json"), out)
  say("\n" + text + "\n\n" + "\n".join(where))
  return out
