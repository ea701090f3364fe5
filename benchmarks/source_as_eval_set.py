"""Write one training source as a retrieval set in the format of ../shared/data/eval/ (corpus.jsonl,
queries.jsonl), so `msa compare` can run msa, MiniLM and BM25 side by side on a source a router never saw
(held out whole with `train-router --heldout-sources`). Passages are deduplicated; a question's gold id is
its positive's.

    python benchmarks/source_as_eval_set.py ../shared/data/train/selqa.jsonl /tmp/selqa_set
    msa compare --data /tmp/selqa_set --out /tmp/selqa_report
"""
from __future__ import annotations

import argparse
import json

from msa_integrations.compare import Document, Query, write_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a training JSONL file: query, positive, title?")
    p.add_argument("out", help="folder to write corpus.jsonl and queries.jsonl into")
    args = p.parse_args()
    ids: dict[str, str] = {}
    corpus, queries = [], []
    with open(args.source, encoding="utf-8") as f:
        for n, line in enumerate(f):
            rec = json.loads(line)
            text = rec["positive"]
            if text not in ids:
                ids[text] = f"p{len(ids):05d}"
                corpus.append(Document(ids[text], text, rec.get("title") or ""))
            queries.append(Query(f"q{n:05d}", rec["query"], (ids[text],), rec.get("answer", "")))
    write_dataset(args.out, corpus, queries)
    print(f"{len(corpus)} passages and {len(queries)} questions written to {args.out}")


if __name__ == "__main__":
    main()
