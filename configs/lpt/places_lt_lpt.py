"""LPT on Places-LT, ViT-B/16 IN-21k (phase 1 then phase 2).

  python launch.py --config configs/lpt/places_lt_lpt.py \
      --config.model.weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_lpt

Paper (Table 8 row d; overall / many / medium / few): 50.07 / 49.27 / 52.31 / 46.88,
1.01M tuned parameters. The phase-1 evaluation of the same run is row (c):
49.41 / 46.89 / 52.54 / 47.32.

Model selection: results are from the last epoch (eval.select='last', the default). The
reference (DongSky/LPT phase2_test/train_dual_dualloss.py) keeps max-va.pth, the epoch with
the best accuracy on the test list, so the paper's number most likely comes from that
checkpoint. eval.select='best' selects on the test set exactly as the reference does (a test
evaluation after every epoch; optimistic, as any selection on the test set).

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.

Evaluate the authors' released phase-2 checkpoint instead of training (their README
reports 50.07 overall for it):
  python launch.py --config configs/lpt/places_lt_lpt.py --stage eval \
      --config.model.released_checkpoint=LPT_places.pth \
      --config.data.root=data/places365 --config.data.lists_dir=data/Places_LT \
      --workdir runs/places_lt_lpt_released
"""
from jaxprompt.lpt import train as lpt


def get_config():
  return lpt.paper_config("places_lt", "lpt")
