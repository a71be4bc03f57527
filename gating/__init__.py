"""Lightning training of gates: `gating.module` (data module, distillation module), `gating.cli`
(`adaptive-sparse train`) and `gating.targets` (featurization cache).

The gate network, its checkpoints and its mask provider are part of the library:
`adaptive_sparse.gates` (GateConfig, GateSet, GateProvider, save_gates, load_gates).
"""
