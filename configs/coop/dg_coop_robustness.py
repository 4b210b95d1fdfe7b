"""CoOp's robustness to distribution shift: trained on ImageNet (16 shots, 50 epochs), evaluated on ImageNet-V2, -Sketch, -A, -R (arg: backbone,M; default RN50,16).

  python launch.py --config configs/coop/dg_coop_robustness.py:RN50,16 \
      --config.model.weights=weights/RN50.pt --config.data.root=data \
      --workdir runs/coop/dg_coop_rn50_m16

Other rows: `:RN50,4` (weights/RN50.pt), `:ViT-B/32,16` (weights/ViT-B-32.pt),
`:ViT-B/16,16` and `:ViT-B/16,4` (weights/ViT-B-16.pt). M=16 is random init, M=4 starts from
"a photo of a". (The ViT-B/16 M=4 prompt of CoCoOp's Table 3 is configs/coop/dg_coop_vit_b16.py.)

Paper (CoOp IJCV Table 1, source ImageNet 16 shots), CoOp:
  backbone  M   imagenet  -v2    -sketch  -a     -r
  RN50      16  62.95     55.11  32.74    22.12  54.96
  RN50      4   63.33     55.40  34.67    23.06  56.60
  ViT-B/32  16  66.85     58.08  40.44    30.62  64.45
  ViT-B/16  16  71.92     64.18  46.71    48.41  74.32
  ViT-B/16  4   71.73     64.56  47.89    49.93  77.32

ImageNet's class names: data/imagenet/classnames.txt (KaiyangZhou/CoOp DATASETS.md).
"""
from __future__ import annotations

from jaxprompt.coop import config as coop_config


def get_config(arg: str = "RN50,16"):
  backbone, _, m = arg.partition(",")
  return coop_config.coop_robustness(backbone or "RN50", int(m or 16))
