"""LPT on CIFAR-100-LT, imbalance ratio 10.

  python launch.py --config configs/lpt/cifar100_lt_r10_lpt.py \
      --config.model.weights=weights/vit_b16_in21k.npz \
      --config.data.root=data/cifar-100-python \
      --workdir runs/cifar100_lt_r10_lpt

Paper (overall accuracy): 91.0. The reference gives no CIFAR recipe: its defaults
(90 epochs, SGD lr 0.02 at batch 256, 224x224 input) are used.

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
  return lpt.paper_config("cifar100_lt", "lpt", imbalance_ratio=10)
