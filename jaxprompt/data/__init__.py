"""Data loading: the generic deterministic loader; readers and samplers build on it."""
from jaxprompt.data.loader import (Loader, PaddedSequentialSampler, SequentialSampler,
                                   ShuffleSampler, collate, sample_rng)

__all__ = ["Loader", "PaddedSequentialSampler", "SequentialSampler", "ShuffleSampler", "collate", "sample_rng"]
