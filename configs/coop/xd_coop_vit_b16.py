"""CoOp trained on all 1,000 ImageNet classes (16 shots, ViT-B/16, M=4 from "a photo of a"), evaluated on the other 10 datasets with their own class names.

  python launch.py --config configs/coop/xd_coop_vit_b16.py \
      --config.model.weights=weights/ViT-B-16.pt --config.data.root=data \
      --workdir runs/coop/xd_coop

Paper (CoCoOp Table 2, ViT-B/16, source ImageNet 16 shots):
  imagenet         71.51
  caltech101       93.70
  oxford_pets      89.14
  stanford_cars    64.51
  oxford_flowers   68.71
  food101          85.30
  fgvc_aircraft    18.47
  sun397           64.15
  dtd              41.92
  eurosat          46.39
  ucf101           66.55
  target average   63.88

xd_* and dg_* train the same prompt: train once with either, then run the other config with
--stage eval on the same workdir (its eval.json / results.json are replaced).
ImageNet's class names: data/imagenet/classnames.txt (KaiyangZhou/CoOp DATASETS.md).
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config
from jaxprompt.coop import paper

TARGETS = ('caltech101', 'oxford_pets', 'stanford_cars', 'oxford_flowers', 'food101', 'fgvc_aircraft', 'sun397', 'dtd', 'eurosat', 'ucf101')


def get_config():
  c = coop_config.base2new('coop', "imagenet")
  c.protocol = "transfer"
  c.eval.targets = TARGETS
  c.paper = paper.transfer('coop', TARGETS)
  return c
