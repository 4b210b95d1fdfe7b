"""Small self-built data and a briefly pretrained backbone for the offline demo runs.

- `write_synthetic_market`: a synthetic person re-identification set in Market-1501's layout.
- `digits_longtail`: a long-tailed classification set from scikit-learn's digits.
- `pretrain_tiny_vit`: a tiny ViT pretrained on procedural glyphs, saved as an AugReg `.npz`.
"""
from jaxprompt.demo.lt_data import LTSplits, digits_longtail, longtail_counts
from jaxprompt.demo.pretrain import (MEAN, STD, GlyphData, pretrain_params, pretrain_tiny_vit,
                                      to_augreg)
from jaxprompt.demo.reid_data import read_manifest, write_synthetic_market

__all__ = ["LTSplits", "digits_longtail", "longtail_counts", "MEAN", "STD", "GlyphData",
           "pretrain_params", "pretrain_tiny_vit", "to_augreg", "read_manifest",
           "write_synthetic_market"]
