"""Does training the upper layers of the backbone (not only the router) lift latent routing? An experiment.

Issue 7's router is trained with the backbone frozen, and its held-out recall has plateaued near 0.62 whatever
the data, width or layers (train loss stays high too: a capacity limit, not an optimisation one). The paper
trains the backbone with the routing loss. This script measures what that buys on the default model:

1. The frozen layers 0..F-1 run once; their output (the residual stream entering layer F) is kept per token
   for every training and held-out document and question (bf16, on the device).
2. Each step runs layers F..max(routing layers) with gradients over the batch's questions and documents,
   pools the documents' normed states over chunks of 64 tokens exactly as encoding does, and takes the
   decoupled InfoNCE loss of the shipped router's per-layer scores (the trainer's own functions).
   The layers and the router are trained together (AdamW, two learning rates, bf16 autocast).
3. Held-out recall (the trainer's split and metric), HotpotQA-100 and NIAH recall through the engine
   (MSARouting over the modified model) are measured before and after, in the same run.

Options for the next questions: --lora-rank r trains rank-r adapters of every projection instead of the
layers (a delta of a few MB could ship; full layers 12-29 are ~63M parameters), and --lm-weight w adds the
next-token loss on a few of the batch's documents, the paper's way to keep the generator a language model.
Each measurement reports the LM loss on held-out documents, so generation drift is visible. --save-router
writes the trained router and adapters as a router file (for msa compare --router); nothing is shipped from
here. Splitting the forward at F is checked against the engine's own caching at start-up.

The library trainer (`msa train-router --tune-from-layer`, msa_core/train_tuned.py) uses the same state
functions; this script keeps what experiments need on top: a wall-clock budget instead of a step count,
full-layer training, and engine recall (HotpotQA, NIAH) before and after in one run.

    python benchmarks/unfrozen_router.py --data 'train/*.jsonl' --first-trainable 12 --train-seconds 240 \
        --hotpotqa eval/hotpotqa100 --niah niah1m --out results.json
"""
import argparse
import glob
import json
import math
import platform
import time
from pathlib import Path

import torch

from msa_core.decoder.lora import adapter_tensors, attach
from msa_core.training.cache import cache_documents, cache_queries
from msa_core.training.data import load_pairs
from msa_core.training.trainer import decoupled_infonce, evaluate, layer_doc_scores
from msa_core.training.tuned import (
    LORA_SCALE,
    TRAIN_DOC_TOKENS,
    document_states,
    lm_loss,
    lower_documents,
    lower_queries,
    question_states,
    ragged_states,
)

EVAL_DOC_TOKENS = 2048


def engine_recall(model, path: str | None, name: str, limit: int | None, ks=(1, 5, 10)) -> dict | None:
    """Recall through the engine itself (index + route), as `msa compare` measures it."""
    if not path:
        return None
    from msa_integrations.compare.dataset import load_dataset
    from msa_integrations.compare.metrics import retrieval_metrics
    from msa_integrations.compare.retrievers import MSARouting

    data = load_dataset(path, limit=limit)
    r = MSARouting(model, name=name, show_progress=False)
    r.index(data.corpus)
    hits = r.search([q.question for q in data.queries], max(ks))
    rankings = [[doc_id for doc_id, _ in h] for h in hits]
    m = retrieval_metrics(rankings, [q.gold_ids for q in data.queries], ks)
    return {k: round(v, 4) for k, v in m.items() if k.startswith("recall")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="glob of training JSONL files (never eval)")
    ap.add_argument("--first-trainable", type=int, default=12)
    ap.add_argument("--train-seconds", type=float, default=240)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--hard-negatives", type=int, default=3)
    ap.add_argument("--lr-backbone", type=float, default=2e-5)
    ap.add_argument("--lr-router", type=float, default=1e-4)
    ap.add_argument("--lora-rank", type=int, default=0, help="train rank-r adapters of the upper layers instead of "
                    "the layers themselves (0: the layers)")
    ap.add_argument("--lm-weight", type=float, default=0.0, help="weight of the LM loss on --lm-docs documents per step")
    ap.add_argument("--lm-docs", type=int, default=16)
    ap.add_argument("--skip-before", action="store_true", help="measure only after training (saves device time "
                    "when the starting point was measured by an earlier run)")
    ap.add_argument("--max-per-source", type=int)
    ap.add_argument("--hotpotqa")
    ap.add_argument("--niah")
    ap.add_argument("--eval-limit", type=int, help="first N questions of each set (and the corpus prefix holding their gold): smoke tests")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-router", metavar="FILE", help="with --lora-rank: write the trained router and its backbone "
                    "adapters as a router file (MSAModel.from_pretrained('default', router=FILE), msa compare --router)")
    args = ap.parse_args()

    from msa_core.model import MSAModel

    t0 = time.perf_counter()
    result: dict = {"args": vars(args), "python": platform.python_version(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True
    model = MSAModel.from_pretrained("default", device=args.device, dtype=torch.float32)
    bb, tok, routing = model.backbone, model.tokenizer, model.config.routing
    layers, first, chunk = list(model.layers), args.first_trainable, model.config.encode.chunk_size
    offset = model.position_offset(routing.top_k)
    if not 0 < first <= min(layers):
        raise SystemExit(f"--first-trainable must be in 1..{min(layers)} (the lowest routing layer)")
    if args.save_router and not args.lora_rank:
        raise SystemExit("--save-router needs --lora-rank: full upper layers are too large to ship in a router file")
    result.update(routing_layers=layers, first_trainable=first, router=model.router_source)

    files = sorted(glob.glob(args.data))
    full = load_pairs(files, title_rate=0.5, max_per_source=args.max_per_source)
    train, held = full.split(0.01, ["nq_qed_dev", "selqa"])
    train.mine_bm25_negatives(30)
    result.update(train_queries=len(train), train_documents=len(train.documents), heldout_queries=len(held),
                  heldout_documents=len(held.documents))
    say(f"data: {len(train)} train questions / {len(train.documents)} docs, {len(held)} held out")

    # Parity: splitting the forward at F gives the engine's own cached states.
    probe_docs, probe_qs = held.documents[:8], held.queries[:8]
    ref_d = cache_documents(bb, tok, probe_docs, layers, dtype=torch.float32)
    ref_q = cache_queries(bb, tok, probe_qs, layers, position_offset=offset, dtype=torch.float32)
    with torch.no_grad():
        got_q, got_d = ragged_states(bb, lower_queries(bb, tok, probe_qs, first, offset, torch.bfloat16),
                                     lower_documents(bb, tok, probe_docs, first, EVAL_DOC_TOKENS, torch.bfloat16),
                                     first, layers, chunk, EVAL_DOC_TOKENS)
    def rel(a, b):
        return float((a - b).norm() / b.norm())
    result["split_parity_rel_error"] = {"documents": rel(got_d.x, ref_d.x), "queries": rel(got_q.x, ref_q.x)}
    say(f"split-forward parity (bf16 residual cache): {result['split_parity_rel_error']}")
    assert torch.equal(got_d.offsets, ref_d.offsets) and torch.equal(got_q.offsets, ref_q.offsets)
    assert max(result["split_parity_rel_error"].values()) < 0.03, "split forward differs from the engine"

    lower_td = lower_documents(bb, tok, train.documents, first, TRAIN_DOC_TOKENS, torch.bfloat16)
    lower_tq = lower_queries(bb, tok, train.queries, first, offset, torch.bfloat16)
    lower_hd = lower_documents(bb, tok, held.documents, first, EVAL_DOC_TOKENS, torch.bfloat16)
    lower_hq = lower_queries(bb, tok, held.queries, first, offset, torch.bfloat16)
    say(f"lower states cached: {lower_td.h.shape[0]} + {lower_tq.h.shape[0]} tokens")

    router = model.router.copy(layers, dtype=torch.float32, device=bb.device)

    def measure(tag: str) -> None:
        bb.eval()
        hq, hd = ragged_states(bb, lower_hq, lower_hd, first, layers, chunk, EVAL_DOC_TOKENS)
        r = evaluate(router, layers, hq, hd, held.positives, routing)
        for layer in layers:  # the engine routes with model.router
            model.router.q_weight(layer).data.copy_(router.q_weight(layer))
            model.router.k_weight(layer).data.copy_(router.k_weight(layer))
        with torch.no_grad():  # generation drift: LM loss on held-out documents (first 256, <= 512 tokens)
            docs = list(range(min(256, len(held.documents))))
            lm = sum(lm_loss(bb, lower_hd, docs[i:i + 32], first, TRAIN_DOC_TOKENS).item() * len(docs[i:i + 32])
                     for i in range(0, len(docs), 32)) / len(docs)
        result[tag] = {"heldout_lm_loss": round(lm, 4),
                       "heldout": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                       "hotpotqa100": engine_recall(model, args.hotpotqa, "msa-" + tag, args.eval_limit),
                       "niah": engine_recall(model, args.niah, "msa-" + tag, args.eval_limit)}
        say(f"{tag}: {json.dumps(result[tag])}")
        save()

    if not args.skip_before:
        measure("before")
    for p in bb.parameters():
        p.requires_grad_(False)
    tuned = range(first, (bb.args.num_layers if args.lm_weight else max(layers) + 1))
    if args.lora_rank:
        trainable = attach(bb, tuned, args.lora_rank, scale=LORA_SCALE)
    else:
        trainable = [p for i in tuned for p in bb.layers[i].parameters()]
    for p in trainable:
        p.requires_grad_(True)
    result["trainable_parameters"] = sum(p.numel() for p in trainable)
    rparams = list(router.parameters())
    for p in rparams:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": trainable, "lr": args.lr_backbone}, {"params": rparams, "lr": args.lr_router}],
                            weight_decay=0.0)
    base = [args.lr_backbone, args.lr_router]
    autocast = torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=bb.device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    history, step, t_train = [], 0, time.perf_counter()
    bb.train()
    while step < args.max_steps:
        frac = (time.perf_counter() - t_train) / args.train_seconds
        if frac >= 1:
            break
        scale = min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * scale
        rows = torch.randint(len(train), (args.batch_size,), generator=gen).tolist()
        docs: dict[int, int] = {}
        for q in rows:
            for d in train.positives[q]:
                docs.setdefault(d, len(docs))
        for q in rows:
            pool = train.mined_negatives[q]
            for j in torch.randperm(len(pool), generator=gen)[: args.hard_negatives].tolist():
                docs.setdefault(pool[j], len(docs))
        order = list(docs)
        positive = torch.zeros(len(rows), len(order), dtype=torch.bool, device=bb.device)
        for b, q in enumerate(rows):
            for d in train.positives[q]:
                positive[b, docs[d]] = True
        with autocast:
            d_x, owner = document_states(bb, lower_td, order, first, layers, chunk, TRAIN_DOC_TOKENS)
            q_x, q_mask = question_states(bb, lower_tq, rows, first, layers)
            losses = [decoupled_infonce(layer_doc_scores(router, layer, q_x[:, :, li], q_mask, d_x[:, li], owner,
                                                         len(order), routing), positive)
                      for li, layer in enumerate(layers)]
            routing_loss = torch.stack(losses).mean()
            lm = lm_loss(bb, lower_td, order[: args.lm_docs], first, TRAIN_DOC_TOKENS) if args.lm_weight else None
            loss = routing_loss if lm is None else routing_loss + args.lm_weight * lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable + rparams, 1.0)
        opt.step()
        step += 1
        if step <= 5 or step % 25 == 0:
            history.append({"step": step, "loss": round(routing_loss.item(), 4),
                            "lm_loss": None if lm is None else round(lm.item(), 4), "documents": len(order),
                            "elapsed": round(time.perf_counter() - t_train, 1)})
            say(json.dumps(history[-1]))
            result["history"] = history
            save()
    for p in bb.parameters():
        p.requires_grad_(False)
    result.update(steps=step, train_seconds=round(time.perf_counter() - t_train, 1), history=history)
    measure("after")
    if args.save_router:
        saved = router.copy(dtype=torch.float16, device="cpu")
        saved.backbone_delta, saved.delta_scale = {n: t.half() for n, t in adapter_tensors(bb).items()}, LORA_SCALE
        saved.save(args.save_router, model.backbone_fingerprint,
                   extra={"unfrozen_router": {k: v for k, v in result.items() if k != "history"}})
        say(f"router and backbone adapters written to {args.save_router}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    say("done")


if __name__ == "__main__":
    main()
