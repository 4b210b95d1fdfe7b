"""CoCoOp base-to-new, ViT-B/16, M=4 from "a photo of a", batch 1, 10 epochs (arg: dataset).

  python launch.py --config configs/coop/base2new_cocoop_vit_b16.py:caltech101 \
      --config.model.weights=weights/ViT-B-16.pt --config.data.root=data \
      --workdir runs/coop/base2new_cocoop_caltech101

Paper (CoCoOp Table 1, ViT-B/16, 16 shots, mean of seeds 1-3), CoCoOp base / new / H:
  imagenet         75.98 / 70.43 / 73.10
  caltech101       97.96 / 93.81 / 95.84
  oxford_pets      95.20 / 97.69 / 96.43
  stanford_cars    70.49 / 73.59 / 72.01
  oxford_flowers   94.87 / 71.75 / 81.71
  food101          90.70 / 91.29 / 90.99
  fgvc_aircraft    33.41 / 23.71 / 27.74
  sun397           79.74 / 76.86 / 78.27
  dtd              77.01 / 56.00 / 64.85
  eurosat          87.49 / 60.04 / 71.21
  ucf101           82.33 / 73.45 / 77.64
  Average (11)     80.47 / 71.69 / 75.83   (H of the averaged base and new)

All datasets and the average row: python -m jaxprompt.coop.evaluate runs/coop/base2new_cocoop_*
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config
from jaxprompt.coop import paper


def get_config(arg: str = "caltech101"):
  c = coop_config.base2new('cocoop', arg)
  c.method = 'cocoop'
  c.paper = paper.base2new('cocoop', arg)
  return c
