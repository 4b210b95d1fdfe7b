"""LPT on iNaturalist 2018, ViT-B/16 IN-21k.

  python launch.py --config configs/lpt/inat2018_lpt.py \
      --config.model.weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/inat2018 --config.data.train_file=data/inat2018/train2018.json \
      --config.data.test_file=data/inat2018/val2018.json \
      --workdir runs/inat2018_lpt

Paper (overall / few): 76.1 / 79.3 (ViT-B/16 baseline 73.2). iNat is not in the reference
repo; its defaults are used.

Model selection: results are from the last epoch (eval.select='last', the default). The
reference (DongSky/LPT phase2_test/train_dual_dualloss.py) keeps max-va.pth, the epoch with
the best accuracy on the test list, so the paper's number most likely comes from that
checkpoint. eval.select='best' selects on the test set exactly as the reference does (a test
evaluation after every epoch; optimistic, as any selection on the test set).

Weights: the AugReg ViT-B/16 IN-21k `.npz` (or its timm state dict), converted once with
`python -m jaxprompt.convert` if it is a torch file. Data layouts: see README.
"""
from jaxprompt.lpt import train as lpt


def get_config():
  return lpt.paper_config("inat2018", "lpt")
