"""A router round that fits on a CPU (issue 22, routing v2): the backbone's states cached once, several arms trained
from the shipped router on them, each scored on wiki-dev from the same cache.

Why this shape. A full router round (the v14 command: 104K questions over 69K documents) caches ~10M tokens of
states: minutes on a GPU, hours on two CPU cores (~800 tokens/s for the default model). This script trains on a
Wikipedia-heavy subset instead: every `msa distill-data` training question (2Wiki passages, teacher-filtered,
denoised negatives), a fixed sample of `--replay` questions from each other training source (so other domains are
not forgotten), span and needle questions as v14's command had, and `nq_qed_dev` held out whole (first
`--heldout-nq` questions) beside 1% of documents. Wikipedia passages are encoded with their titles (as wiki-dev
and the A/B harness index them), so a training passage and the same passage in wiki-dev's corpus share one cached
state: the whole 6,118-passage ranking set costs no extra forward.

    python benchmarks/router_cpu_round.py prepare --state-dir /tmp/r15 --wiki /tmp/wiki_pseudo
    python benchmarks/router_cpu_round.py train --state-dir /tmp/r15 --arm s600:steps=600 \
        --out benchmarks/results/router_training/v15_cpu.json

wiki-dev recall here comes from the trainer's `evaluate` over cached states (the scoring code `retrieve` uses, fp32
keys); the `v14` row is the shipped router on the same states, so arms and baseline are side by side. Arms are
written as router files into --state-dir for the engine checks (dev NIAH, HotpotQA-100) of a qualifying arm.
Never reads ../shared/data/eval/.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_scoring_dev import read_jsonl  # noqa: E402

from msa_core import MSAModel  # noqa: E402
from msa_core.training.cache import RaggedStates, cache_documents, cache_queries  # noqa: E402
from msa_core.training.precondition import condition  # noqa: E402
from msa_core.training.run import save_trained_router  # noqa: E402
from msa_core.training.trainer import RouterTrainer, TrainConfig, TrainReport, evaluate, read_training_data  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "train"
BLOCK = 500  # texts cached per saved block: an interrupted prepare resumes at the first missing block


def titled(title: str, text: str) -> str:
    return f"{title}\n{text}"


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def data_files(wiki: Path, state_dir: Path, replay: int, heldout_nq: int) -> list[Path]:
    """The round's training files: titled wiki questions, a seeded replay sample per source, held-out NQ."""
    wiki_rows = []
    for r in read_jsonl(wiki / "train.jsonl"):
        negs = [titled(n["title"], n["text"]) for n in r.get("negatives", [])]
        wiki_rows.append({**r, "positive": titled(r["title"], r["positive"]), "title": None, "negatives": negs})
    rng, by_source = random.Random(0), {}
    for path in sorted(DATA.glob("*.jsonl")):
        if path.stem == "nq_qed_dev":
            continue
        for r in read_jsonl(path):
            by_source.setdefault(str(r.get("source") or path.stem), []).append(r)
    replay_rows = [r for s in sorted(by_source) for r in rng.sample(by_source[s], min(replay, len(by_source[s])))]
    nq = [{**r, "source": "nq_qed_dev"} for r in read_jsonl(DATA / "nq_qed_dev.jsonl")[:heldout_nq]]
    return [write_jsonl(wiki_rows, state_dir / "wiki_titled.jsonl"), write_jsonl(replay_rows, state_dir / "replay.jsonl"),
            write_jsonl(nq, state_dir / "nq_heldout.jsonl")]


def cached(kind: str, texts: list[str], state_dir: Path, compute) -> RaggedStates:
    """States of `texts` in blocks of BLOCK saved under state_dir (resumable), joined into one RaggedStates."""
    xs, counts = [], []
    for b, start in enumerate(range(0, len(texts), BLOCK)):
        path = state_dir / f"{kind}-{b:04d}.pt"
        if not path.exists():
            t = time.perf_counter()
            rs = compute(texts[start : start + BLOCK])
            torch.save({"x": rs.x, "offsets": rs.offsets}, path)
            print(f"{kind} block {b}: {len(texts[start:start + BLOCK])} texts in {time.perf_counter() - t:.1f} s",
                  flush=True)
        saved = torch.load(path)
        xs.append(saved["x"])
        counts.append(saved["offsets"][1:] - saved["offsets"][:-1])
    count = torch.cat(counts)
    return RaggedStates(torch.cat(xs), torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)]))


def pick(states: RaggedStates, rows: list[int]) -> RaggedStates:
    """A new RaggedStates of the given items, in that order."""
    x, _ = states.flat(rows)
    lens = states.lengths()[rows]
    return RaggedStates(x.clone(), torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]))


def load_model() -> MSAModel:
    torch.manual_seed(0)
    return MSAModel.from_pretrained("default", device="cpu")


def base_config(args) -> TrainConfig:
    return TrainConfig(heldout_fraction=0.01, heldout_sources=["nq_qed_dev"], needles=args.needles,
                       span_pairs=args.span_pairs, seed=0, cache_batch_tokens=8192)


def prepare(args) -> None:
    sd = args.state_dir
    sd.mkdir(parents=True, exist_ok=True)
    files = data_files(args.wiki, sd, args.replay, args.heldout_nq)
    model = load_model()
    full, train, heldout, _ = read_training_data(files, base_config(args))
    corpus = read_jsonl(args.wiki / "dev" / "corpus.jsonl")
    dev_queries = read_jsonl(args.wiki / "dev" / "queries.jsonl")
    doc_texts = list(dict.fromkeys([*train.documents, *heldout.documents,
                                    *(titled(r["title"], r["text"]) for r in corpus)]))
    q_texts = list(dict.fromkeys([*train.queries, *heldout.queries, *(q["question"] for q in dev_queries)]))
    with (sd / "sets.pkl").open("wb") as f:
        pickle.dump({"train": train, "heldout": heldout, "corpus": corpus, "dev_queries": dev_queries,
                     "doc_texts": doc_texts, "q_texts": q_texts, "sources": full.source_counts(),
                     "files": [str(p) for p in files]}, f)
    print(f"{len(train)} training questions over {len(train.documents)} documents; {len(heldout)} held out; "
          f"{len(doc_texts)} documents and {len(q_texts)} questions to cache", flush=True)
    layers, enc = list(model.layers), model.config.encode
    bb, tok = model.backbone, model.tokenizer
    offset = model.position_offset(model.config.routing.top_k)
    cached("docs", doc_texts, sd, lambda t: cache_documents(bb, tok, t, layers, chunk_size=enc.chunk_size,
                                                            max_doc_tokens=enc.max_doc_tokens, batch_size=256,
                                                            max_tokens_per_batch=8192))
    cached("queries", q_texts, sd, lambda t: cache_queries(bb, tok, t, layers, position_offset=offset,
                                                           batch_size=256, max_tokens_per_batch=8192))


def arm_config(args, spec: str) -> tuple[str, TrainConfig]:
    """NAME:key=value,key=value over TrainConfig fields (steps, lr, tau, teacher_weight...)."""
    name, _, rest = spec.partition(":")
    fields = base_config(args).model_dump()
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        fields[key] = type(fields[key])(value) if fields[key] is not None else float(value)
    return name, TrainConfig(**fields)


def train(args) -> None:
    sd = args.state_dir
    with (sd / "sets.pkl").open("rb") as f:
        sets = pickle.load(f)
    model = load_model()
    layers, routing = list(model.layers), model.config.routing
    docs = cached("docs", sets["doc_texts"], sd, None)
    qs = cached("queries", sets["q_texts"], sd, None)
    doc_row = {t: i for i, t in enumerate(sets["doc_texts"])}
    q_row = {t: i for i, t in enumerate(sets["q_texts"])}
    tr, ho = sets["train"], sets["heldout"]
    td, tq = pick(docs, [doc_row[t] for t in tr.documents]), pick(qs, [q_row[t] for t in tr.queries])
    hd, hq = pick(docs, [doc_row[t] for t in ho.documents]), pick(qs, [q_row[t] for t in ho.queries])
    corpus_ids = [r["id"] for r in sets["corpus"]]
    dd = pick(docs, [doc_row[titled(r["title"], r["text"])] for r in sets["corpus"]])
    dq = pick(qs, [q_row[q["question"]] for q in sets["dev_queries"]])
    col = {i: n for n, i in enumerate(corpus_ids)}
    dev_pos = [[col[g] for g in q["gold_ids"]] for q in sets["dev_queries"]]
    start = model.router.copy(layers, dtype=torch.float32, device="cpu", init_mode=f"trained-from-{model.router.init_mode}")
    results = {"device": "cpu", "threads": torch.get_num_threads(), "sources": sets["sources"],
               "train_questions": len(tr), "train_documents": len(tr.documents), "heldout_questions": len(ho),
               "dev_questions": len(dq), "dev_documents": len(dd), "arms": {}}

    def scores(router, q_states, d_states, positives):
        r = evaluate(router, layers, q_states, d_states, positives, routing)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}

    results["arms"]["v14"] = {"wiki_dev": scores(start, dq, dd, dev_pos), "heldout": scores(start, hq, hd, ho.positives)}
    print("v14", json.dumps(results["arms"]["v14"]), flush=True)
    probe = start.copy(layers, dtype=torch.float32, device="cpu")
    pre = condition(probe, layers, "standardize", [tq, hq, dq], [td, hd, dd], seed=0)  # states now S·x, in place
    for spec in args.arm:
        name, cfg = arm_config(args, spec)
        router = start.copy(layers, dtype=torch.float32, device="cpu", init_mode=start.init_mode)
        pre.into_conditioned(router)
        torch.manual_seed(cfg.seed)
        trainer = RouterTrainer(router, layers, tr, tq, td, ho, hq, hd, cfg, routing, log=print)
        t = time.perf_counter()
        trainer.run()
        seconds = round(time.perf_counter() - t, 1)
        row = {"config": spec, "train_seconds": seconds, "wiki_dev": scores(router, dq, dd, dev_pos),
               "heldout": scores(router, hq, hd, ho.positives),
               "history": [h for h in trainer.history if "heldout" in h]}
        saved = router.copy(layers, dtype=torch.float32, device="cpu")
        pre.fold(saved)
        saved.backbone_delta, saved.delta_scale = trainer.backbone_delta()
        report = TrainReport(steps=trainer.step, seconds=seconds, device="cpu", layers=layers,
                             train_queries=len(tr), train_documents=len(tr.documents), heldout_queries=len(ho),
                             heldout_documents=len(ho.documents), sources=sets["sources"], history=trainer.history,
                             final=row["heldout"] | {"all_layers": row["heldout"]}, timings={"train": seconds})
        row["router"] = str(save_trained_router(saved, sd / f"{name}.safetensors", model, cfg, report, sets["files"]))
        results["arms"][name] = row
        print(name, json.dumps({k: row[k] for k in ("wiki_dev", "heldout", "train_seconds")}), flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "train"])
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--wiki", type=Path, default=Path("/tmp/wiki_pseudo"), help="msa distill-data's output folder")
    ap.add_argument("--replay", type=int, default=150, help="questions sampled per other training source")
    ap.add_argument("--heldout-nq", type=int, default=400)
    ap.add_argument("--needles", type=int, default=500)
    ap.add_argument("--span-pairs", type=int, default=3000)
    ap.add_argument("--arm", action="append", default=[], help="NAME:field=value,... (TrainConfig fields)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "router_training" / "v15_cpu.json")
    args = ap.parse_args()
    if "eval" in args.wiki.resolve().parts:
        raise SystemExit("choose on a dev split of training data, never on ../shared/data/eval/")
    prepare(args) if args.command == "prepare" else train(args)


if __name__ == "__main__":
    main()
