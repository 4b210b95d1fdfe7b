"""VPT-deep on CIFAR-100-LT, imbalance ratio 200.

  python launch.py --config configs/lpt/cifar100_lt_r200_vpt.py \
      --config.model.weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/cifar-100-python \
      --workdir runs/cifar100_lt_r200_vpt

Paper (overall accuracy): 72.8.

Recipe: one VPT configuration, KMnP/vpt configs/prompt/cub.yaml over
configs/base-prompt.yaml (SGD 0.9, lr 0.1 @ 256, wd 0.01, batch 128, 100 epochs with 10
warm-up epochs, warm-up cosine); the LPT paper gives no VPT hyper-parameters. Deliberately
shared with LPT so the baseline is comparable: the AugReg IN-21k tower, LayerNorm eps 1e-5,
mean = std = 0.5 and LPT's crops (RandomResizedCrop(224) + flip; square Resize(256) +
CenterCrop(224)); VPT's own code uses the ViT-paper weights, eps 1e-6, ImageNet mean/std and
Resize(256) + RandomCrop(224).

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import baselines as vpt


def get_config():
  return vpt.paper_config("cifar100_lt", "vpt_deep", imbalance_ratio=200)
