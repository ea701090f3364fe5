"""Router training: decoupled InfoNCE (paper Eq. 5) on cached backbone states (trainer.py, cache.py),
training data and synthetic questions (data.py), preconditioning of the cached states
(precondition.py) and LoRA tuning of the upper layers with the router (tuned.py).

May import: everything below the facade, and the facade (`msa_core.model`) for loading a model to train.
Nothing below imports training.
"""
