"""CoOp few-shot, RN50, M=16 random init, class token middle, class-specific context (arg: dataset,shots).

  python launch.py --config configs/coop/fewshot_rn50_csc_middle.py:caltech101,16 \
      --config.model.weights=weights/RN50.pt --config.data.root=data \
      --workdir runs/coop/fewshot_rn50_csc_middle_caltech101_16

Paper: this variant is in the few-shot figure only (curves, no table); the table of
the unified / end variant, for comparison, is in configs/coop/fewshot_rn50_end.py.

Epochs follow KaiyangZhou/CoOp COOP.md: 1 shot 50, 2/4 shots 100, 8/16 shots 200, ImageNet 50.
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config


def get_config(arg: str = "caltech101,16"):
  dataset, shots = arg.split(",") if "," in arg else (arg, "16")
  c = coop_config.coop_rn50_fewshot(dataset, int(shots), csc=True, position='middle')
  c.paper = {}  # the paper plots this variant (no table); nothing to print beside ours
  return c
