"""Gate networks (SeerAttention-style) and their distillation with Lightning.

Light imports only: `gating.gates` and `gating.provider` need torch (and transformers for the
capture at run time); Lightning is imported by `gating.module` and `gating.cli`.
"""

from gating.gates import (
    PRESETS,
    Gate,
    GateConfig,
    GateSet,
    gate_parameter_count,
    parameter_report,
    pool_blocks,
)
from gating.provider import GateProvider, QKCapture, load_gates, save_gates

__all__ = ["PRESETS", "Gate", "GateConfig", "GateProvider", "GateSet", "QKCapture",
           "gate_parameter_count", "load_gates", "parameter_report", "pool_blocks", "save_gates"]
