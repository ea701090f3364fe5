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
Each measurement reports the LM loss on held-out documents, so generation drift is visible. Nothing this
script trains is saved or shipped. Splitting the forward at F is checked against the engine's own caching at
start-up.

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

from msa_core.encode import plan_batches, pool_chunks
from msa_core.generate import build_prompt, left_pad, query_positions
from msa_core.lora import adapter_tensors, attach
from msa_core.train import decoupled_infonce, evaluate, layer_doc_scores
from msa_core.train_cache import RaggedStates, cache_documents, cache_queries
from msa_core.train_data import load_pairs

LORA_SCALE = 2.0  # alpha = 2r
TRAIN_DOC_TOKENS = 512  # documents are cut here for training steps (most are shorter); evaluation uses 2048
EVAL_DOC_TOKENS = 2048


class LowerStates:
    """Per-token residual stream entering layer F, for many sequences back to back."""

    def __init__(self, h: torch.Tensor, positions: torch.Tensor, routing: torch.Tensor, offsets: list[int],
                 ids: torch.Tensor | None = None):
        self.h, self.positions, self.routing, self.offsets, self.ids = h, positions, routing, offsets, ids

    def token_ids(self, items: list[int], t: int) -> torch.Tensor:
        """Right-padded token ids [B, t] of `items` (documents only)."""
        out = torch.zeros(len(items), t, dtype=torch.long, device=self.h.device)
        for row, i in enumerate(items):
            n = min(t, self.offsets[i + 1] - self.offsets[i])
            out[row, :n] = self.ids[self.offsets[i]:self.offsets[i] + n]
        return out

    def batch(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded h [B, T, hidden], positions [B, T], routing [B, T], lengths [B]."""
        lens = [self.offsets[i + 1] - self.offsets[i] for i in items]
        t, dev = max(lens), self.h.device
        h = self.h.new_zeros(len(items), t, self.h.shape[-1])
        pos = torch.zeros(len(items), t, dtype=torch.long, device=dev)
        rout = torch.zeros(len(items), t, dtype=torch.bool, device=dev)
        for row, (i, n) in enumerate(zip(items, lens)):
            s = self.offsets[i]
            h[row, :n], pos[row, :n], rout[row, :n] = self.h[s:s + n], self.positions[s:s + n], self.routing[s:s + n]
        return h, pos, rout, torch.tensor(lens, device=dev)

    def lengths(self) -> list[int]:
        if not hasattr(self, "_lengths"):
            self._lengths = [self.offsets[i + 1] - self.offsets[i] for i in range(len(self.offsets) - 1)]
        return self._lengths


@torch.no_grad()
def lower_documents(bb, tok, texts, first: int, max_tokens: int) -> LowerStates:
    ids_all = [ids[:max_tokens] for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]
    lens = [len(x) for x in ids_all]
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    dev = bb.device
    h_out = torch.empty(offsets[-1], bb.args.hidden_size, dtype=torch.bfloat16, device=dev)
    for batch in plan_batches(lens, 256, 65536):
        t = lens[batch[0]]
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :lens[i]] = torch.tensor(ids_all[i])
        ids = ids.to(dev)
        h = bb(ids, torch.arange(t, device=dev).expand_as(ids), last_layer=first - 1)
        for row, i in enumerate(batch):
            h_out[offsets[i]:offsets[i + 1]] = h[row, :lens[i]].to(torch.bfloat16)
    pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
    ids = torch.tensor([t for x in ids_all for t in x], dtype=torch.long, device=dev)
    return LowerStates(h_out, pos, torch.ones_like(pos, dtype=torch.bool), offsets, ids)


@torch.no_grad()
def lower_queries(bb, tok, queries, first: int, position_offset: int) -> LowerStates:
    prompts = [build_prompt(tok, q) for q in queries]
    lens = [len(p.ids) for p in prompts]
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    dev = bb.device
    h_out = torch.empty(offsets[-1], bb.args.hidden_size, dtype=torch.bfloat16, device=dev)
    pos_out = torch.empty(offsets[-1], dtype=torch.long, device=dev)
    rout_out = torch.empty(offsets[-1], dtype=torch.bool, device=dev)
    for batch in plan_batches(lens, 512, 65536):
        ids, valid, routing = left_pad([prompts[i] for i in batch], tok.pad_token_id or 0, dev)
        pos = query_positions(valid, position_offset)
        h = bb(ids, pos, valid=valid, last_layer=first - 1)
        for row, i in enumerate(batch):
            v = valid[row]
            h_out[offsets[i]:offsets[i + 1]] = h[row][v].to(torch.bfloat16)
            pos_out[offsets[i]:offsets[i + 1]] = pos[row][v]
            rout_out[offsets[i]:offsets[i + 1]] = routing[row][v]
    return LowerStates(h_out, pos_out, rout_out, offsets)


def upper(bb, h, positions, first: int, layers: list[int], last: int | None = None):
    """Layers first..last (default max(layers)) over right-padded sequences (pads last, causal: real tokens
    never see them); returns each routing layer's normed input, as Backbone.forward's capture hook sees
    it, and the residual stream after `last` under the key "out"."""
    h = h.float()
    cos, sin = bb.rotary(positions, h.dtype)
    out = {}
    for i in range(first, (max(layers) if last is None else last) + 1):
        layer = bb.layers[i]
        x = layer.input_layernorm(h)
        if i in layers:
            out[i] = x
        h = h + layer.self_attn(x, cos, sin, None, None, None)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    out["out"] = h
    return out


def lm_loss(bb, lower: "LowerStates", items: list[int], first: int, max_tokens: int) -> torch.Tensor:
    """Next-token cross-entropy of the backbone over the documents `items` (the LM loss that keeps the
    generator a language model while its upper layers learn to route)."""
    h, pos, _, n = lower.batch(items)
    t = min(h.shape[1], max_tokens)
    n = n.clamp(max=t)
    final = upper(bb, h[:, :t], pos[:, :t], first, [first], last=bb.args.num_layers - 1)["out"]
    logits = bb.lm_head(bb.norm(final[:, :-1])).float()
    target = lower.token_ids(items, t)[:, 1:]
    real = torch.arange(t - 1, device=h.device)[None, :] < (n[:, None] - 1)
    return torch.nn.functional.cross_entropy(logits[real], target[real])


def doc_states(bb, lower: LowerStates, items: list[int], first, layers, chunk, max_tokens, token_budget):
    """Pooled states [C, L, hidden] of `items` and the owner (position in items) of each chunk."""
    all_lens = lower.lengths()
    lens = [min(all_lens[i], max_tokens) for i in items]
    xs, owners = [], []
    for sub in plan_batches(lens, 512, token_budget):
        h, pos, _, n = lower.batch([items[j] for j in sub])
        t = min(h.shape[1], max_tokens)
        n = n.clamp(max=t)
        states = upper(bb, h[:, :t], pos[:, :t], first, layers)
        pooled = torch.stack([pool_chunks(states[layer], n, chunk) for layer in layers], dim=2)  # [b, C, L, hid]
        counts = (n + chunk - 1) // chunk
        for row, j in enumerate(sub):
            xs.append(pooled[row, :int(counts[row])])
            owners.append(torch.full((int(counts[row]),), j, dtype=torch.long, device=h.device))
    return torch.cat(xs), torch.cat(owners)


def query_states(bb, lower: LowerStates, items: list[int], first, layers, max_routing=128):
    """Routing-token states [B, T, L, hidden] (left-aligned) and their mask [B, T]."""
    h, pos, rout, _ = lower.batch(items)
    states = upper(bb, h, pos, first, layers)
    x = torch.stack([states[layer] for layer in layers], dim=2)  # [B, T, L, hid]
    counts = rout.sum(1).clamp(max=max_routing)
    m = int(counts.max())
    q_x = x.new_zeros(len(items), m, len(layers), x.shape[-1])
    mask = torch.arange(m, device=x.device)[None, :] < counts[:, None]
    for row in range(len(items)):
        q_x[row, :int(counts[row])] = x[row][rout[row]][:int(counts[row])]
    return q_x, mask


@torch.no_grad()
def ragged(bb, docs: LowerStates, queries: LowerStates, first, layers, chunk):
    """Held-out states as the trainer caches them, computed through the (possibly trained) upper layers."""
    n_docs = len(docs.offsets) - 1
    d_x, owner = doc_states(bb, docs, list(range(n_docs)), first, layers, chunk, EVAL_DOC_TOKENS, 131072)
    order = torch.argsort(owner, stable=True)
    d_off = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(owner.cpu(), minlength=n_docs).cumsum(0)])
    qs, q_off = [], [0]
    n_q = len(queries.offsets) - 1
    for s in range(0, n_q, 512):
        q_x, mask = query_states(bb, queries, list(range(s, min(s + 512, n_q))), first, layers)
        for row in range(q_x.shape[0]):
            qs.append(q_x[row][mask[row]])
            q_off.append(q_off[-1] + int(mask[row].sum()))
    return RaggedStates(torch.cat(qs), torch.tensor(q_off)), RaggedStates(d_x[order], d_off)


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
    offset = model._position_offset(routing.top_k)
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
        got_q, got_d = ragged(bb, lower_documents(bb, tok, probe_docs, first, EVAL_DOC_TOKENS),
                              lower_queries(bb, tok, probe_qs, first, offset), first, layers, chunk)
    def rel(a, b):
        return float((a - b).norm() / b.norm())
    result["split_parity_rel_error"] = {"documents": rel(got_d.x, ref_d.x), "queries": rel(got_q.x, ref_q.x)}
    say(f"split-forward parity (bf16 residual cache): {result['split_parity_rel_error']}")
    assert torch.equal(got_d.offsets, ref_d.offsets) and torch.equal(got_q.offsets, ref_q.offsets)
    assert max(result["split_parity_rel_error"].values()) < 0.03, "split forward differs from the engine"

    lower_td = lower_documents(bb, tok, train.documents, first, TRAIN_DOC_TOKENS)
    lower_tq = lower_queries(bb, tok, train.queries, first, offset)
    lower_hd = lower_documents(bb, tok, held.documents, first, EVAL_DOC_TOKENS)
    lower_hq = lower_queries(bb, tok, held.queries, first, offset)
    say(f"lower states cached: {lower_td.h.shape[0]} + {lower_tq.h.shape[0]} tokens")

    router = model.router.copy(layers, dtype=torch.float32, device=bb.device)

    def measure(tag: str) -> None:
        bb.eval()
        hq, hd = ragged(bb, lower_hd, lower_hq, first, layers, chunk)
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
            d_x, owner = doc_states(bb, lower_td, order, first, layers, chunk, TRAIN_DOC_TOKENS, 65536)
            q_x, q_mask = query_states(bb, lower_tq, rows, first, layers)
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
