"""VPT-deep on Places-LT without balanced sampling (linear head, CE).

  python launch.py --config configs/lpt/places_lt_vpt.py \
      --config.model.weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_vpt

Paper (Table 1; overall / many / medium / few): 37.52 / 50.42 / 33.78 / 23.29, 92K prompt
parameters.

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
  return vpt.paper_config("places_lt", "vpt_deep")
