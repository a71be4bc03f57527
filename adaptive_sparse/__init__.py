"""adaptive-sparse: learned, adaptive block sparsity for the attention of pretrained LMs."""

from adaptive_sparse.attention.api import block_sparse_attention
from adaptive_sparse.masks import BlockSparseMask

__version__ = "0.1.0"

__all__ = ["BlockSparseMask", "block_sparse_attention", "__version__"]
