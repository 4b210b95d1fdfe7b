"""Training losses."""
from jaxprompt.losses.reid import (batch_hard_triplet, cross_entropy_label_smooth,
                                   i2t_cross_entropy, pairwise_euclidean, supcon)

__all__ = ["batch_hard_triplet", "cross_entropy_label_smooth", "i2t_cross_entropy",
           "pairwise_euclidean", "supcon"]
