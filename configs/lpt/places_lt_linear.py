"""Linear probe on the frozen ViT-B/16 IN-21k, Places-LT, plain sampling.

  python launch.py --config configs/lpt/places_lt_linear.py \
      --config.model.vit_weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_linear

Paper (Table 1; overall / many / medium / few): 33.29 / 46.48 / 29.45 / 18.77.

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import baselines as vpt


def get_config():
  return vpt.paper_config("places_lt", "linear")
