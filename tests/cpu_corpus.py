"""The small corpus the CPU-precision and question-head tests share (tiny random models, two routing layers)."""

from msa_core import MSAConfig

DOCS = {
    "light": "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "ferry": "Ferries leave the harbour every morning at seven and return at dusk.",
    "paris": "Paris is the capital of France. What is the capital of France?",
    "cheese": "Cheese from the island is aged in caves for two winters.",
    "msa": "Memory sparse attention routes a question to the documents it needs.",
}
QUESTIONS = ["When was the lighthouse built?", "capital of France", "Who built the lighthouse of Velmora in 1887?"]
CFG = MSAConfig(routing={"top_k": 2, "layers": [1, 2]}, encode={"chunk_size": 4, "max_doc_tokens": 24})
