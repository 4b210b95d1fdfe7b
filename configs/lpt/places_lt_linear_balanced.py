"""Linear probe on Places-LT with balanced (dual) sampling.

  python launch.py --config configs/lpt/places_lt_linear_balanced.py \
      --config.model.vit_weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_linear_balanced

Paper (Table 1; overall / many / medium / few): 41.33 / 49.47 / 41.31 / 27.51.

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import baselines as vpt


def get_config():
  return vpt.paper_config("places_lt", "linear", balanced=True)
