from adaptive_sparse.attention.api import BACKENDS, block_sparse_attention

__all__ = ["BACKENDS", "block_sparse_attention"]
