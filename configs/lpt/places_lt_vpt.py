"""VPT-deep on Places-LT without balanced sampling (linear head, CE).

  python launch.py --config configs/lpt/places_lt_vpt.py \
      --config.model.vit_weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_vpt

Paper (Table 1; overall / many / medium / few): 37.52 / 50.42 / 33.78 / 23.29, 92K prompt
parameters. VPT's base recipe; the LPT paper gives no VPT hyperparameters.

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import baselines as vpt


def get_config():
  return vpt.paper_config("places_lt", "vpt_deep")
