"""Linear probe on Places-LT with balanced sampling: LPT's phase-1 recipe without prompts or A-GCL.

  python launch.py --config configs/lpt/places_lt_linear_balanced.py \
      --config.model.weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_linear_balanced

Paper (Table 1; overall / many / medium / few): 41.33 / 49.47 / 41.31 / 27.51.

How the recipe was inferred: the paper gives no recipe for this row, but its Table 8 row (a)
(phase 1 without prompts and without A-GCL) reports exactly these four numbers. So this is
LPT's phase-1 recipe on the frozen tower with no prompt: cosine head, dual (class-aware +
instance-balanced) sampling, feature dropout 0.1, SGD 0.9 with lr 0.02 @ 256 and wd 0.01,
90 epochs, timm cosine, and softmax cross-entropy on the scaled cosine logits instead of
A-GCL.

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import baselines as vpt


def get_config():
  return vpt.paper_config("places_lt", "linear", balanced=True)
