"""CoCoOp trained on all 1,000 ImageNet classes (16 shots, ViT-B/16, M=4 from "a photo of a"), evaluated on ImageNet-V2, -Sketch, -A, -R.

  python launch.py --config configs/coop/dg_cocoop_vit_b16.py \
      --config.model.weights=weights/ViT-B-16.pt --config.data.root=data \
      --workdir runs/coop/dg_cocoop

Paper (CoCoOp Table 3, ViT-B/16, source ImageNet 16 shots):
  imagenet         71.02
  imagenetv2       64.07
  imagenet_sketch  48.75
  imagenet_a       50.63
  imagenet_r       76.18

xd_* and dg_* train the same prompt: train once with either, then run the other config with
--stage eval on the same workdir (its eval.json / results.json are replaced).
ImageNet's class names: data/imagenet/classnames.txt (KaiyangZhou/CoOp DATASETS.md).
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config
from jaxprompt.coop import paper

TARGETS = ('imagenetv2', 'imagenet_sketch', 'imagenet_a', 'imagenet_r')


def get_config():
  c = coop_config.base2new('cocoop', "imagenet")
  c.protocol = "transfer"
  c.eval.targets = TARGETS
  c.paper = paper.transfer('cocoop', TARGETS)
  return c
