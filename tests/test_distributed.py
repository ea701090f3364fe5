"""Memory Parallel (msa_core/distributed.py): 2 gloo processes on CPU give what one process gives.

One spawn runs every scenario (process start-up dominates): each rank writes its results as JSON,
the test compares them with MSAModel on the whole bank. Scenarios cover an uneven split (7 parents,
one split into parts, over 2 ranks), k above one shard's documents and above the whole bank, a
filter, both sharding strategies and a batch of questions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msa_core import InvalidInputError, MemoryBank, MSAConfig, MSAModel
from msa_core.distributed import (
    DistributedMemoryRouter,
    ShardedBank,
    distributed_answer,
    distributed_retrieve,
    load_sharded,
    merge_top_k,
    shard_rows,
)
from msa_core.inference.generate import MemoryRouter, build_prompt, left_pad, query_positions
from msa_core.routing.scores import select_top_k

WORLD = 2
DOCS = {
    "light": "The lighthouse of Velmora was built in 1887 by the engineer Ada Quist.",
    "ferry": "Ferries leave the harbour every morning at seven and return at dusk.",
    "paris": "Paris is the capital of France.",
    "cheese": "Cheese from the island is aged in caves for two winters.",
    "long": " ".join(["Memory sparse attention routes a question to the documents it needs."] * 6),
    "abc": "abcdefghijklmnopqrstuvwxyz and the numbers 0123456789.",
    "msa": "What is the capital of France? Paris, and the ferries return at dusk.",
}
YEARS = [1887, 2020, 1900, 2001, 2024, 1950, 1999]
QUESTIONS = ["Who built the lighthouse of Velmora?", "When do the ferries return?"]
# (strategy, k, filter)
SCENARIOS = [
    ("contiguous", 5, None),
    ("round_robin", 2, {"year": {"$gte": 1950}}),
    ("contiguous", 10, {"year": {"$lt": 2021}}),
]
MAX_NEW = 5


def _model(path: str) -> MSAModel:
    cfg = MSAConfig(routing={"top_k": 2}, encode={"chunk_size": 4, "max_doc_tokens": 24})
    return MSAModel.from_pretrained(path, config=cfg, device="cpu")


def _prefill(model: MSAModel, question: str, make_router) -> dict:
    """One routed prefill: per-layer selected rows/scores and the last position's logits."""
    prompt = build_prompt(model.tokenizer, question)
    ids, valid, routing = left_pad([prompt], 0, model.backbone.device)
    pos = query_positions(valid, model.position_offset(model.config.routing.top_k))
    router = make_router(routing, pos)
    with torch.no_grad():
        hidden = model.backbone(ids, pos, valid=valid, memory_hook=router)
        logits = model.backbone.logits(hidden[:, -1])[0]
    return {"selected": {str(layer): r.selected[0].tolist() for layer, r in router.routings.items()},
            "scores": {str(layer): r.selected_scores[0].tolist() for layer, r in router.routings.items()},
            "logits": logits.tolist()}


def _answer(model: MSAModel, run) -> dict:
    """Run an answer while recording the logits of every step."""
    steps, original = [], model.backbone.logits
    model.backbone.logits = lambda h: steps.append(original(h)) or steps[-1]
    try:
        ans = run()
    finally:
        del model.backbone.logits
    return {"text": ans.text, "doc_ids": ans.doc_ids, "scores": ans.scores,
            "layers": {str(k): v for k, v in ans.layer_selections.items()}, "logits": [s[0].tolist() for s in steps]}


def _hits(hits) -> list:
    return [[h.to_dict() for h in per_q] for per_q in hits]


def _single(model: MSAModel, bank: MemoryBank) -> list[dict]:
    out = []
    for _, k, flt in SCENARIOS:
        allowed = bank.row_mask(flt)
        out.append({
            "retrieve": _hits(model.retrieve(QUESTIONS, bank, k=k, filter=flt, layer_scores=True)),
            "parts": _hits([model.retrieve(QUESTIONS[0], bank, k=k, filter=flt, include_parts=True)]),
            "prefill": _prefill(model, QUESTIONS[0], lambda routing, pos, allowed=allowed, k=k: MemoryRouter(
                bank, model.router, model.config.routing, routing, allowed=allowed, top_k=k, positions=pos)),
            "answer": _answer(model, lambda k=k, flt=flt: model.answer(QUESTIONS[1], bank, mode="latent", k=k, filter=flt,
                                                          max_new_tokens=MAX_NEW)),
        })
    return out


def _worker(rank: int, model_path: str, bank_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = _model(model_path)
        bank = model.load_bank(bank_path)
        results = []
        for strategy, k, flt in SCENARIOS:
            shard = ShardedBank.from_bank(bank, rank, WORLD, strategy=strategy)
            allowed = shard.local.row_mask(flt)
            results.append({
                "local_parts": shard.local.num_parts,
                "local_docs": len(shard.local),
                "retrieve": _hits(distributed_retrieve(model, QUESTIONS, shard, k=k, filter=flt, layer_scores=True)),
                "parts": _hits([distributed_retrieve(model, QUESTIONS[0], shard, k=k, filter=flt,
                                                     include_parts=True)]),
                "prefill": _prefill(model, QUESTIONS[0], lambda routing, pos, shard=shard, allowed=allowed, k=k: DistributedMemoryRouter(
                    shard, model.router, model.config.routing, routing, allowed=allowed, top_k=k, positions=pos)),
                "answer": _answer(model, lambda shard=shard, k=k, flt=flt: distributed_answer(model, QUESTIONS[1], shard, k=k, filter=flt,
                                                                    max_new_tokens=MAX_NEW)),
            })
        loaded, cut = load_sharded(bank_path), ShardedBank.from_bank(bank, rank, WORLD)
        same_load = (torch.equal(loaded.global_rows, cut.global_rows)
                     and all(torch.equal(getattr(loaded.local, n), getattr(cut.local, n))
                             for n in ("k_bar", "v_bar", "kr_bar"))
                     and loaded.local.docstore == cut.local.docstore)
        try:  # ranks disagreeing on the question must fail on every rank, not hang
            distributed_retrieve(model, QUESTIONS[rank], cut, k=2)
            mismatch = "no error"
        except InvalidInputError:
            mismatch = "raised"
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"results": results, "same_load": same_load, "mismatch": mismatch}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    model_path = tiny_model_dir("qwen3")
    model = _model(str(model_path))
    metas = [{"year": y} for y in YEARS]
    bank = model.index(list(DOCS.values()), ids=list(DOCS), metadatas=metas)
    assert bank.num_parts > len(bank)  # the long document was split into parts
    out = tmp_path_factory.mktemp("dist")
    bank.save(out / "bank")
    expected = json.loads(json.dumps(_single(model, bank)))  # same float round trip as the workers'
    mp.spawn(_worker, args=(str(model_path), str(out / "bank"), str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return expected, ranks, bank


def _close(a: list, b: list, tol: float = 1e-5) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=0)


@pytest.mark.parametrize("i", range(len(SCENARIOS)))
def test_distributed_matches_one_process(runs, i):
    expected, ranks, bank = runs
    exp = expected[i]
    assert sum(r["results"][i]["local_parts"] for r in ranks) == bank.num_parts
    for r in ranks:
        got = r["results"][i]
        assert got["prefill"]["selected"] == exp["prefill"]["selected"]  # identical rows per layer
        assert got["prefill"]["scores"].keys() == exp["prefill"]["scores"].keys()
        assert all(_close(got["prefill"]["scores"][layer], v, 1e-6) for layer, v in exp["prefill"]["scores"].items())
        assert _close(got["prefill"]["logits"], exp["prefill"]["logits"])
        for key in ("retrieve", "parts"):
            assert [[h["id"] for h in q] for q in got[key]] == [[h["id"] for h in q] for q in exp[key]]
            for gq, eq in zip(got[key], exp[key]):
                for g, e in zip(gq, eq):
                    assert g["score"] == pytest.approx(e["score"], abs=1e-6)
                    assert (g["text"], g["metadata"], g.get("layer_scores") is None) == \
                        (e["text"], e["metadata"], e.get("layer_scores") is None)
        ga, ea = got["answer"], exp["answer"]
        assert (ga["text"], ga["doc_ids"], ga["layers"]) == (ea["text"], ea["doc_ids"], ea["layers"])
        assert ga["scores"] == pytest.approx(ea["scores"], abs=1e-6)
        assert len(ga["logits"]) == len(ea["logits"])
        assert all(_close(g, e) for g, e in zip(ga["logits"], ea["logits"]))


def test_scenarios_cover_the_hard_cases(runs):
    expected, ranks, bank = runs
    assert len(bank) % WORLD != 0  # uneven split
    assert len({r["results"][0]["local_parts"] for r in ranks}) == WORLD
    assert all(r["results"][0]["local_docs"] < SCENARIOS[0][1] for r in ranks)  # k above one shard's documents
    assert min(r["results"][2]["local_parts"] for r in ranks) < SCENARIOS[2][1]  # ... and above its part rows
    assert len(expected[2]["retrieve"][0]) < SCENARIOS[2][1]  # k above the filtered bank


def test_load_sharded_and_argument_check(runs):
    _, ranks, _ = runs
    assert all(r["same_load"] for r in ranks)
    assert all(r["mismatch"] == "raised" for r in ranks)


# ---- no process group needed ---------------------------------------------------------------------
def test_shard_rows_keep_parents_whole_and_cover_the_bank():
    parents = [[0], [1, 2, 3], [4], [5, 6], [7], [8]]
    for strategy in ("contiguous", "round_robin"):
        for world in (1, 2, 3, 4, 7):
            shards = [shard_rows(parents, r, world, strategy) for r in range(world)]
            assert sorted(r for s in shards for r in s) == list(range(9))
            for rows in parents:
                assert sum(set(rows) <= set(s) for s in shards) == 1
    with pytest.raises(InvalidInputError):
        shard_rows(parents, 2, 2)


def test_merge_top_k_equals_select_top_k_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 11), generator=gen).float()  # many ties
    owner = torch.randint(0, 3, (11,), generator=gen)
    for k in (1, 4, 11, 20):
        want_v, want_i = select_top_k(scores, k)
        cand_s, cand_r = [], []
        for rank in range(3):
            rows = (owner == rank).nonzero().flatten()
            s = torch.full((3, k), float("-inf"))
            r = torch.full((3, k), -1, dtype=torch.long)
            kl = min(k, len(rows))
            if kl:
                v, i = select_top_k(scores[:, rows], kl)
                s[:, :kl], r[:, :kl] = v, rows[i]
            cand_s.append(s), cand_r.append(r)
        got_v, got_i = merge_top_k(torch.cat(cand_s, 1), torch.cat(cand_r, 1), k)
        assert torch.equal(got_i, want_i) and torch.equal(got_v, want_v)
