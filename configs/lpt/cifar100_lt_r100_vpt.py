"""VPT-deep on CIFAR-100-LT, imbalance ratio 100.

  python launch.py --config configs/lpt/cifar100_lt_r100_vpt.py \
      --config.model.vit_weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/cifar-100-python \
      --workdir runs/cifar100_lt_r100_vpt

Paper (overall accuracy): 81.0. VPT's base recipe (the LPT paper gives none).

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import baselines as vpt


def get_config():
  return vpt.paper_config("cifar100_lt", "vpt_deep", imbalance_ratio=100)
