"""CoOp trained on all 1,000 ImageNet classes (16 shots, ViT-B/16, M=4 from "a photo of a"), evaluated on ImageNet-V2, -Sketch, -A, -R.

  python launch.py --config configs/coop/dg_coop_vit_b16.py \
      --config.model.weights=weights/ViT-B-16.pt --config.data.root=data \
      --workdir runs/coop/dg_coop

Paper (CoCoOp Table 3, ViT-B/16, source ImageNet 16 shots):
  imagenet         71.51
  imagenetv2       64.20
  imagenet_sketch  47.99
  imagenet_a       49.71
  imagenet_r       75.21

xd_* and dg_* train the same prompt: train once with either, then run the other config with
--stage eval on the same workdir (its eval.json / results.json are replaced).
ImageNet's class names: data/imagenet/classnames.txt (KaiyangZhou/CoOp DATASETS.md).
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config
from jaxprompt.coop import paper

TARGETS = ('imagenetv2', 'imagenet_sketch', 'imagenet_a', 'imagenet_r')


def get_config():
  c = coop_config.base2new('coop', "imagenet")
  c.protocol = "transfer"
  c.eval.targets = TARGETS
  c.paper = paper.transfer('coop', TARGETS)
  return c
