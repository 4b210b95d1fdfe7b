"""Weight conversion: reference checkpoints -> arrays the Flax towers load."""
