"""Checkpoints: the embedded default model and hub/offline resolution (defaults.py) and the released MSA
format (msa_format.py: read and write MSA-format folders).

May import: everything below the facade (decoder, memory, routing, inference). The facade imports it
lazily; it never imports the facade: it builds the model through a constructor it is given.
"""
