"""Gates: the SeerAttention-style gate network, its checkpoints and its mask provider.

network.py     GateConfig, Gate, GateSet, pooling and rotary at block positions
checkpoint.py  save_gates / load_gates (strict), resolve_gates_dir
provider.py    QKCapture (pre-rotary q/k hooks) and GateProvider (masks for sparse_attention)
No Lightning here: training lives in `gating/` (gating.module, gating.cli).
"""

from adaptive_sparse.gates.checkpoint import load_gates, read_gates_info, resolve_gates_dir, save_gates
from adaptive_sparse.gates.network import (
    MODEL_SHAPES,
    Gate,
    GateConfig,
    GateSet,
    ModelShapes,
    gate_parameter_count,
    model_shapes,
    parameter_report,
    pool_blocks,
)
from adaptive_sparse.gates.provider import GateProvider, QKCapture

__all__ = ["MODEL_SHAPES", "Gate", "GateConfig", "GateProvider", "GateSet", "ModelShapes",
           "QKCapture", "gate_parameter_count", "load_gates", "model_shapes", "parameter_report",
           "pool_blocks", "read_gates_info", "resolve_gates_dir", "save_gates"]
