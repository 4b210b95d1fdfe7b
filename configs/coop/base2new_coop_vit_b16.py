"""CoOp base-to-new, ViT-B/16, M=4 from "a photo of a", batch 32, 200 epochs (50 on ImageNet) (arg: dataset).

  python launch.py --config configs/coop/base2new_coop_vit_b16.py:caltech101 \
      --config.model.weights=weights/ViT-B-16.pt --config.data.root=data \
      --workdir runs/coop/base2new_coop_caltech101

Paper (CoCoOp Table 1, ViT-B/16, 16 shots, mean of seeds 1-3), CoOp base / new / H:
  imagenet         76.47 / 67.88 / 71.92
  caltech101       98.00 / 89.81 / 93.73
  oxford_pets      93.67 / 95.29 / 94.47
  stanford_cars    78.12 / 60.40 / 68.13
  oxford_flowers   97.60 / 59.67 / 74.06
  food101          88.33 / 82.26 / 85.19
  fgvc_aircraft    40.44 / 22.30 / 28.75
  sun397           80.60 / 65.89 / 72.51
  dtd              79.44 / 41.18 / 54.24
  eurosat          92.19 / 54.74 / 68.69
  ucf101           84.69 / 56.05 / 67.46
  Average (11)     82.69 / 63.22 / 71.66   (H of the averaged base and new)

All datasets and the average row: python -m jaxprompt.coop.evaluate runs/coop/base2new_coop_*
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config
from jaxprompt.coop import paper


def get_config(arg: str = "caltech101"):
  c = coop_config.base2new('coop', arg)
  c.method = 'coop'
  c.paper = paper.base2new('coop', arg)
  return c
