"""Routing: router projectors W_QR / W_KR and their files (projectors.py), paper Eq. 2 scores, reductions,
top-k and layer aggregation (scores.py, the plain-PyTorch reference of `msa_core.kernels`), and MMR over
documents' pooled routing keys (mmr.py).

May import: the ground floor, `msa_core.decoder` (LoRA deltas carried in router files) and
`msa_core.memory`. Never inference, checkpoints, training or the facade.
"""
