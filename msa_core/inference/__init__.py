"""Inference over a backbone and a bank: document encoding (encode.py, stage 1), the routed prefill and
decoding (generate.py: prompts, `MemoryRouter`, `routed_prefill`, sampling, streaming), and the strategies
built on them: the authors' `reference` semantics (reference.py), memory interleave (interleave.py) and the
step-by-step trace (debug.py).

May import: the ground floor, decoder, memory, routing, kernels. Never checkpoints, training, the facade
(`msa_core.model`) or the CLI: code that needs the model takes the parts it uses (a Protocol).
"""
