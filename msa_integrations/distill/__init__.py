"""Router training data distilled from an offline teacher (routing v2, candidate c).

    from msa_integrations.distill import build_distill_set
    build_distill_set("2wiki_corpus.jsonl", "wiki_pseudo/", exclude=["eval/hotpotqa100/corpus.jsonl"])

`questions` writes template pseudo-questions over titled passages; `teacher` keeps those a teacher retriever
(MiniLM + BM25 by default) agrees with and gives them negatives it ranks below every positive. The command
line is `msa distill-data`.
"""

from .questions import Passage, PseudoQuestion, make_questions
from .teacher import build_distill_set, read_passages, teacher_label

__all__ = ["Passage", "PseudoQuestion", "build_distill_set", "make_questions", "read_passages", "teacher_label"]
