"""Linear-probe CLIP RN50: logistic regression on frozen features, C searched on the few-shot val set (arg: dataset,shots).

  python launch.py --config configs/coop/linear_probe_rn50.py:caltech101,16 \
      --config.model.weights=weights/RN50.pt --config.data.root=data \
      --workdir runs/coop/linear_probe_rn50_caltech101_16

Paper: ImageNet 16 shots 55.87 (the other datasets are given as curves in CoOp's Figure 3).
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config


def get_config(arg: str = "caltech101,16"):
  dataset, shots = arg.split(",") if "," in arg else (arg, "16")
  c = coop_config.base_config()
  c.method, c.data.name, c.data.shots = "linear_probe", dataset, int(shots)
  c.seeds = tuple(range(1, 11))  # lpclip/linear_probe.py averages 10 runs (--num_run 10)
  c.paper = {"acc": 55.87} if (dataset, int(shots)) == ("imagenet", 16) else {}
  return c
