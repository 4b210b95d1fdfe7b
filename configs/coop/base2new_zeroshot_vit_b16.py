"""Zero-shot CLIP ViT-B/16 on the base and new halves (arg: dataset).

  python launch.py --config configs/coop/base2new_zeroshot_vit_b16.py:caltech101 \
      --config.model.weights=weights/ViT-B-16.pt --config.data.root=data \
      --workdir runs/coop/base2new_zeroshot_caltech101

Paper (CoCoOp Table 1, ViT-B/16, 16 shots, mean of seeds 1-3), CLIP base / new / H:
  imagenet         72.43 / 68.14 / 70.22
  caltech101       96.84 / 94.00 / 95.40
  oxford_pets      91.17 / 97.26 / 94.12
  stanford_cars    63.37 / 74.89 / 68.65
  oxford_flowers   72.08 / 77.80 / 74.83
  food101          90.10 / 91.22 / 90.66
  fgvc_aircraft    27.19 / 36.29 / 31.09
  sun397           69.36 / 75.35 / 72.23
  dtd              53.24 / 59.90 / 56.37
  eurosat          56.48 / 64.05 / 60.03
  ucf101           70.53 / 77.50 / 73.85
  Average (11)     69.34 / 74.22 / 71.70   (H of the averaged base and new)

All datasets and the average row: python -m jaxprompt.coop.evaluate runs/coop/base2new_zeroshot_*
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config
from jaxprompt.coop import paper


def get_config(arg: str = "caltech101"):
  c = coop_config.base2new("coop", arg)
  c.method = 'zeroshot'
  c.paper = paper.base2new('zeroshot', arg)
  return c
