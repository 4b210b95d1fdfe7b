"""Market-1501, ViT-B/16: CLIP-ReID baseline (image encoder fine-tuned with ID + triplet losses, no text stage).

  python launch.py --config configs/clipreid/market1501_vit_b16_baseline.py \
      --config.model.weights=weights/clip_vit_b16.npz \
      --config.data.root=data/market1501 \
      --workdir runs/market1501_vit_b16_baseline

Paper (mAP / R1, no re-ranking): 86.4 / 93.3. Numbers are from the last epoch, as the
reference reports them.

Weights: OpenAI's ViT-B-16.pt (or its `.npz` from `python -m jaxprompt.convert`).
Evaluate an authors' released checkpoint instead of training:
  python launch.py --config configs/clipreid/market1501_vit_b16_baseline.py --stage eval \
      --config.model.released_checkpoint=PATH.pth --config.data.root=data/market1501 --workdir runs/market1501_vit_b16_baseline_released
"""
from jaxprompt.clipreid import config as clipreid


def get_config():
  return clipreid.paper_config("market1501", "vit_b16", "baseline")
