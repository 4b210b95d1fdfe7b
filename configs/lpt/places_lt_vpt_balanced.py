"""VPT-deep on Places-LT with balanced (dual) sampling and a cosine head.

  python launch.py --config configs/lpt/places_lt_vpt_balanced.py \
      --config.model.vit_weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_vpt_balanced

Paper (Table 1; overall / many / medium / few): 44.17 / 45.79 / 46.73 / 36.18.

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import baselines as vpt


def get_config():
  return vpt.paper_config("places_lt", "vpt_deep", balanced=True)
