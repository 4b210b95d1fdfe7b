"""CoCoOp trained on all 1,000 ImageNet classes (16 shots, ViT-B/16, M=4 from "a photo of a"), evaluated on the other 10 datasets with their own class names.

  python launch.py --config configs/coop/xd_cocoop_vit_b16.py \
      --config.model.weights=weights/ViT-B-16.pt --config.data.root=data \
      --workdir runs/coop/xd_cocoop

Paper (CoCoOp Table 2, ViT-B/16, source ImageNet 16 shots):
  imagenet         71.02
  caltech101       94.43
  oxford_pets      90.14
  stanford_cars    65.32
  oxford_flowers   71.88
  food101          86.06
  fgvc_aircraft    22.94
  sun397           67.36
  dtd              45.73
  eurosat          45.37
  ucf101           68.21
  target average   65.74

xd_* and dg_* train the same prompt: train once with either, then run the other config with
--stage eval on the same workdir (its eval.json / results.json are replaced).
ImageNet's class names: data/imagenet/classnames.txt (KaiyangZhou/CoOp DATASETS.md).
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config
from jaxprompt.coop import paper

TARGETS = ('caltech101', 'oxford_pets', 'stanford_cars', 'oxford_flowers', 'food101', 'fgvc_aircraft', 'sun397', 'dtd', 'eurosat', 'ucf101')


def get_config():
  c = coop_config.base2new('cocoop', "imagenet")
  c.protocol = "transfer"
  c.eval.targets = TARGETS
  c.paper = paper.transfer('cocoop', TARGETS)
  return c
