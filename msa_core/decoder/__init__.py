"""The decoder: Llama / Qwen2 / Qwen3 blocks with our own attention, RoPE and KV cache (memory K/V is
spliced in per layer), and LoRA adapters of its layers.

May import: the ground floor (`msa_core.errors`, `msa_core.config`). Never memory, routing or above.
"""
