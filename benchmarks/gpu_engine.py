"""The inference engine on one GPU at MSA-4B shapes, side by side with plain transformers (issue 23).

    python benchmarks/gpu_engine.py --out benchmarks/results/gpu_engine/h200.json
    python benchmarks/gpu_engine.py --tiny --device cpu --out /tmp/gpu_engine_cpu.json   # a CPU check of the script

MSA-4B shapes (Qwen3: 36 layers, hidden 2560, 32/8 heads of 128, routing layers 18-35, vocab 151,936,
tied embeddings), random bf16 weights, the tests' tiny tokenizer. In one run:
- decode tokens/s at batch 1 and 16: msa's engine (static caches, CUDA-graph replay per step; with
  --compile also torch.compile'd), each step timed with CUDA events; transformers eager (its own decode
  loop, DynamicCache, each step CUDA-event timed); transformers `generate` with
  cache_implementation="static" (it compiles its forward itself), timed as the difference of two
  warmed-up generate calls; the HBM roofline (weights and KV read once per token at --hbm-tb-s);
- time to first token: latent (routing + prefill + first token) with a bank of 8 x 512-token documents
  and with banks of 1M and 10M tokens (the 8 documents' encoded tensors repeated under new ids), against
  text RAG (transformers prefill of the same 8 documents as text plus the question, first token);
- retrieve latency (question forward to the last routing layer, scores, top-k) at each bank size; the rows
  `*_int8` repeat TTFT, retrieve and the bank-sized scoring step with routing.score_keys='int8';
- encode tokens/s against transformers' own forward over the same 8 documents (both warmed up, medians of 5;
  msa's includes tokenizing and pooling), and msa's first call on 64 documents (shapes never seen before); with
  --compile-encode also with EncodeConfig.compile (the encoding forward torch.compile'd; `encode_tok_s` is then
  that one, `encode_tok_s_eager` the other). --only-encode stops after these rows and transformers' forward.
Ratios: decode_ratio = msa batch-1 decode / transformers eager; ttft_ratio = latent TTFT with the 1M bank
/ text RAG; encode_ratio = msa encode / transformers forward.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from msa4b_smoke import MSA_4B, TINY, documents, random_backbone, random_router  # noqa: E402
from msa_tiny import save_msa_tokenizer  # noqa: E402

from msa_core import MSAModel, __version__  # noqa: E402
from msa_core.inference.generate import MemoryRouter, build_prompt, engine_for, routed_prefill  # noqa: E402
from msa_core.kernels.routing import inverse_key_norms, layer_routing_scores  # noqa: E402
from msa_core.routing.scores import quantized_keys  # noqa: E402
from msa_core.memory.encoded import EncodedDocuments  # noqa: E402
from msa_core.routing.scores import aggregate_layers  # noqa: E402

NEW_TOKENS = 128


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def wall_ms(fn, dev: torch.device) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return (time.perf_counter() - t) * 1e3


def median_ms(fn, dev: torch.device, reps: int) -> float:
    fn()  # warm-up
    return statistics.median(wall_ms(fn, dev) for _ in range(reps))


def timed_steps(step, n: int, dev: torch.device) -> float:
    """Median ms of `step()` over n calls, each bracketed by CUDA events (wall clock on CPU)."""
    times = []
    for _ in range(n):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            times.append(wall_ms(step, dev))
    return statistics.median(times)


# ---- msa ----------------------------------------------------------------------------------------

def build_model(shape: dict, tokenizer, dtype: torch.dtype, dev: torch.device, compile_decode: bool) -> MSAModel:
    first, last = (int(x) for x in shape["layers"].split("-"))
    layers = list(range(first, last + 1))
    msa_config = {"router_layer_idx": ",".join(map(str, layers)), "decouple_router": True,
                  "pooling_kernel_size": shape["pooling"], "doc_top_k": 8, "top_k_docs": 8,
                  "head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max",
                  "aux_loss_method": "INFONCE_DECOUPLE"}
    vocab = shape["vocab_size"] or len(tokenizer)
    model = MSAModel.from_msa_components(random_backbone(shape, vocab, dtype, dev), tokenizer, msa_config,
                                         router=random_router(layers, shape, dtype, dev), profile="default",
                                         config={"encode": {"batch_size": 64, "max_tokens_per_batch": 32768}},
                                         name="msa-4b-shaped-random")
    return model


def msa_decode(model: MSAModel, bank, questions: list[str], k: int, dev: torch.device, steps: int) -> float:
    """Median ms of one decode step (engine.decode_one_token + greedy pick) for a batch of questions."""
    cfg = model.config.routing
    prompts = [build_prompt(model.tokenizer, q) for q in questions]
    state = routed_prefill(model.backbone, prompts, offset=model.position_offset(k), extra_capacity=steps + 8,
                           hook=lambda r, p: MemoryRouter(bank, model.router, cfg, r, top_k=k, positions=p))
    engine, session = engine_for(model.backbone), state.session
    token = state.logits.argmax(-1)

    def step():
        nonlocal token
        token = engine.decode_one_token(session, token).argmax(-1)

    for _ in range(3):  # graph capture and warm-up
        step()
    return timed_steps(step, steps - 4, dev)


def greedy(model: MSAModel, bank, question: str, dev: torch.device, steps: int = 16) -> list[int]:
    """The first greedy tokens of a latent answer (to compare the decode variants)."""
    cfg = model.config.routing
    state = routed_prefill(model.backbone, [build_prompt(model.tokenizer, question)], offset=model.position_offset(8),
                           extra_capacity=steps + 8,
                           hook=lambda r, p: MemoryRouter(bank, model.router, cfg, r, top_k=8, positions=p))
    engine, token, out = engine_for(model.backbone), state.logits.argmax(-1), []
    for _ in range(steps):
        out.append(int(token[0]))
        token = engine.decode_one_token(state.session, token).argmax(-1)
    return out


def grow(bank, tokens: int) -> None:
    """Repeat the bank's encoded tensors under new ids until it holds about `tokens` tokens."""
    parts, have = bank.docstore, bank.info()["tokens"]
    copies = -(-tokens // have) - 1
    if copies <= 0:
        return
    base = {n: getattr(bank, n) for n in ("k_bar", "v_bar", "kr_bar")}
    n = len(parts) * copies
    ids = [f"r{i}" for i in range(n)]
    bank.add(EncodedDocuments(ids=ids, parent_ids=ids, texts=[p.text for p in parts] * copies, metadatas=[{}] * n,
                              n_tokens=[p.n_tokens for p in parts] * copies,
                              n_chunks=[p.n_chunks for p in parts] * copies, layers=bank.layers,
                              part_index=[0] * n, **{k: v.repeat(1, copies, 1, 1) for k, v in base.items()}))


def scoring_ms(model: MSAModel, tokens: int, dev: torch.device, doc_tokens: int = 512, reps: int = 5,
               keys: str = "bank") -> float:
    """The part of retrieve that grows with the bank, alone: a 64-token question bucket's routing queries
    scored against `tokens` tokens of K̄_R (random, on the GPU; no K̄/V̄) in every routing layer in one launch
    (as MemoryRouter.score_queries), layers aggregated on the device, the ranking copied to the host, its
    top 256 taken there (as MSAModel.retrieve). keys: 'bank' (bf16 keys and their inverse norms) or 'int8'
    (routing.score_keys='int8': the same keys quantised, with their scales). Median ms."""
    cfg, a = model.config.routing, model.backbone.args
    pool, layers = model.config.encode.chunk_size, len(model.layers)
    chunks = tokens // pool
    keys_bf16 = torch.randn(layers, chunks, a.kv_heads, a.head_dim, dtype=model.backbone.dtype, device=dev)
    if keys == "int8":
        kr, scales = quantized_keys(keys_bf16, cfg.normalization)
        columns = {"key_scales": scales}
        del keys_bf16, scales
    else:
        kr, columns = keys_bf16, {"key_inv_norms": inverse_key_norms(keys_bf16)}
    chunk_doc = torch.arange(chunks, device=dev) // (doc_tokens // pool)
    docs = int(chunk_doc[-1]) + 1
    q = torch.randn(layers, 1, 64, a.num_heads, a.head_dim, dtype=model.backbone.dtype, device=dev)
    mask = torch.ones(1, 64, dtype=torch.bool, device=dev)

    def run():
        scores = layer_routing_scores(q, mask, kr, chunk_doc, docs, normalization=cfg.normalization,
                                      query_reduce=cfg.query_reduce, chunk_reduce=cfg.chunk_reduce, validate=False,
                                      exact=cfg.exact_scores, **columns)
        total = aggregate_layers(scores, cfg.layer_aggregate).cpu()[0]
        return torch.topk(total, min(256, docs)).indices

    run()
    return median_ms(run, dev, reps)  # (the caller empties the CUDA cache once the keys are freed)


# ---- transformers ---------------------------------------------------------------------------------

def hf_model(shape: dict, vocab: int, dtype: torch.dtype, dev: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], rope_theta=shape["rope_theta"],
                      max_position_embeddings=shape["max_pos"], tie_word_embeddings=True, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    return model


def hf_forward_tok_s(hf, tokenizer, texts: list[str], doc_tokens: int, dev: torch.device) -> float:
    """transformers' forward over the documents (padded to one batch, at most doc_tokens each): tokens/s, median of 5."""
    ids = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=doc_tokens)["input_ids"]
    ids = ids.to(dev)
    return ids.numel() / median_ms(lambda: hf.model(input_ids=ids), dev, 5) * 1e3


def hf_eager_decode(hf, ids: torch.Tensor, dev: torch.device, steps: int) -> float:
    out = hf(input_ids=ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def step():
        nonlocal past, token
        o = hf(input_ids=token, past_key_values=past, use_cache=True)
        past, token = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(3):
        step()
    return timed_steps(step, steps - 4, dev)


def hf_static_decode(hf, ids: torch.Tensor, dev: torch.device, steps: int) -> float:
    """ms per token of generate(cache_implementation="static"): (t(steps) - t(2)) / (steps - 2), warmed up."""
    def gen(n: int):
        return lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   cache_implementation="static", pad_token_id=0)

    for _ in range(2):
        gen(steps)()  # compiles (first calls)
    long = median_ms(gen(steps), dev, 3)
    short = median_ms(gen(2), dev, 3)
    return (long - short) / (steps - 2)


def roofline_tok_s(hf, context: int, hbm_tb_s: float, batch: int = 1) -> float:
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied embedding counted once
    c = hf.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * 2 * batch
    return batch * hbm_tb_s * 1e12 / (weights + kv)


def profile(model: MSAModel, tokenizer, doc_tokens: int, compiled: bool, path: Path) -> None:
    """Where the time goes: CUDA kernel totals of 20 decode steps and of 5 latent first tokens."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dev = model.backbone.device
    texts, questions = documents(tokenizer, 8, doc_tokens), documents(tokenizer, 6, 40, seed=7)
    bank = model.index(texts, ids=[f"d{i}" for i in range(8)], show_progress_bar=False)
    grow(bank, 1_000_000)
    engine = engine_for(model.backbone)
    engine.set_compile(compiled)
    cfg = model.config.routing
    state = routed_prefill(model.backbone, [build_prompt(model.tokenizer, questions[0])], offset=model.position_offset(8),
                           extra_capacity=64, hook=lambda r, p: MemoryRouter(bank, model.router, cfg, r, top_k=8,
                                                                             positions=p))
    token = state.logits.argmax(-1)
    for _ in range(3):
        token = engine.decode_one_token(state.session, token).argmax(-1)
    report = []
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=acts) as prof:
        for _ in range(20):
            token = engine.decode_one_token(state.session, token).argmax(-1)
        sync(dev)
    report.append("== 20 decode steps\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    model.answer(questions[0], bank, mode="latent", k=8, max_new_tokens=1)
    with torch_profile(activities=acts) as prof:
        for q in questions[1:]:
            model.answer(q, bank, mode="latent", k=8, max_new_tokens=1)
        sync(dev)
    report.append("== 5 latent first tokens (1M-token bank)\n"
                  + prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    path.write_text("\n\n".join(report))
    print("\n\n".join(report)[:6000])


# ---- main -----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32 (a CPU check of the script)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--sizes", default="1e6,1e7", help="bank sizes in tokens for TTFT and retrieve (default: 1e6,1e7)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the engine's decode step")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of --compile, e.g. "
                    "max-autotune-no-cudagraphs (Engine.set_compile)")
    ap.add_argument("--variants", default=None, help="decode variants to run (default: graph_unpacked,graph and, "
                    "with --compile, compiled)")
    ap.add_argument("--only-decode", action="store_true", help="stop after the decode rows (a probe)")
    ap.add_argument("--compile-encode", action="store_true",
                    help="also encode with EncodeConfig.compile (encode_tok_s_compiled; compiling takes minutes)")
    ap.add_argument("--only-encode", action="store_true",
                    help="stop after the encode rows and transformers' forward beside them (encode_ratio)")
    ap.add_argument("--skip-hf-static", action="store_true", help="skip transformers' static-cache generate")
    ap.add_argument("--hbm-tb-s", type=float, default=4.8, help="HBM bandwidth for the roofline (H200: 4.8)")
    ap.add_argument("--profile", action="store_true", help="only profile: the top CUDA kernels of a decode step and "
                    "of a latent time-to-first-token, written to OUT (text)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_grad_enabled(False)
    shape = dict(TINY if args.tiny else MSA_4B)
    dtype = torch.float32 if args.tiny or dev.type == "cpu" else torch.bfloat16
    steps = 16 if args.tiny else NEW_TOKENS
    doc_tokens = 40 if args.tiny else 512
    sizes = [int(float(s)) for s in args.sizes.split(",")] if not args.tiny else [2_000, 8_000]
    tok_dir = Path(tempfile.mkdtemp(prefix="gpu-engine-tok-"))
    save_msa_tokenizer(tok_dir)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    out = {"msa_version": __version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(dev)
           if dev.type == "cuda" else platform.processor() or "cpu", "shape": shape, "dtype": str(dtype),
           "decode_steps": steps, "note": "random weights; decode steps CUDA-event timed, medians"}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        path.write_text(json.dumps(out, indent=1) + "\n")

    model = build_model(shape, tokenizer, dtype, dev, args.compile)
    engine = engine_for(model.backbone)
    if args.profile:
        return profile(model, tokenizer, doc_tokens, args.compile, path)
    texts = documents(tokenizer, 64 if not args.tiny else 8, doc_tokens)
    questions = documents(tokenizer, 17, 40 if not args.tiny else 12, seed=7)
    model.index(texts[:2], ids=["w0", "w1"])  # warm-up
    bank = model.new_bank()
    encode_ms = wall_ms(lambda: model.add(bank, texts, ids=[f"e{i}" for i in range(len(texts))],
                                          show_progress_bar=False), dev)
    out["encode_tok_s_64docs_first_call"] = bank.info()["tokens"] / encode_ms * 1e3  # shapes never seen before
    texts = texts[:8]
    # as transformers' forward below: the same 8 documents, warmed up, median of 5 (tokenizing included here)
    tokens = model.index(texts, show_progress_bar=False).info()["tokens"]
    encode_ms = median_ms(lambda: model.add(model.new_bank(), texts, ids=[f"e{i}" for i in range(8)],
                                            show_progress_bar=False), dev, 5)
    out["encode_tok_s"] = out["encode_tok_s_eager"] = tokens / encode_ms * 1e3
    if args.compile_encode and dev.type == "cuda":  # EncodeConfig.compile: warmed on two shapes (static, dynamic)
        model.config.encode.compile = True
        t = time.perf_counter()
        for n in (8, 5):
            model.add(model.new_bank(), texts[:n], ids=[f"c{i}" for i in range(n)], show_progress_bar=False)
        out["encode_compile_s"] = time.perf_counter() - t
        encode_ms = median_ms(lambda: model.add(model.new_bank(), texts, ids=[f"e{i}" for i in range(8)],
                                                show_progress_bar=False), dev, 5)
        out["encode_tok_s"] = out["encode_tok_s_compiled"] = tokens / encode_ms * 1e3
    if args.only_encode:  # beside transformers' forward over the same documents, then stop
        hf = hf_model(shape, shape["vocab_size"] or len(tokenizer), dtype, dev)
        out["hf_forward_tok_s"] = hf_forward_tok_s(hf, tokenizer, texts, doc_tokens, dev)
        out["encode_ratio"] = out["encode_tok_s"] / out["hf_forward_tok_s"]
        save()
        print(json.dumps(out, indent=1), flush=True)
        return
    bank = model.new_bank()
    model.add(bank, texts, ids=[f"d{i}" for i in range(8)], show_progress_bar=False)
    if dev.type == "cuda":  # every bank tensor on the GPU, the tier whose routed prefill replays from a graph
        bank = bank.to(dev)
    out["bank_tier"] = f"{bank.device.type}, kv={bank.kv_tier}"

    # decode, batch 1 and 16: CUDA graphs without and with the fused GPU projections (decoder/packed.py), then
    # (--compile) graphs of the torch.compile'd step
    variants = (args.variants.split(",") if args.variants else
                ("graph_unpacked", "graph", "compiled") if args.compile else ("graph_unpacked", "graph"))
    out["compile_mode"] = args.compile_mode
    for variant in variants:
        engine.set_compile(variant == "compiled", args.compile_mode if variant == "compiled" else None)
        model.backbone.packs.gpu = variant != "graph_unpacked"
        engine.drop_graphs()
        engine = engine_for(model.backbone)  # (makes the packs)
        out[f"gpu_packs_{variant}"] = len(model.backbone.packs) if model.backbone.packs.gpu else 0  # in use
        t = time.perf_counter()
        for b in (1, 16):
            ms = msa_decode(model, bank, questions[:b], 8, dev, steps)
            out[f"decode_ms_batch{b}_{variant}"] = ms
            out[f"decode_tok_s_batch{b}_{variant}"] = b * 1e3 / ms
        out[f"decode_setup_s_{variant}"] = time.perf_counter() - t
        out[f"greedy_tokens_{variant}"] = greedy(model, bank, questions[0], dev)
    best = "compiled" if "compiled" in variants else "graph"
    out["decode_tok_s_batch1"] = out[f"decode_tok_s_batch1_{best}"]
    out["decode_tok_s_batch16"] = out[f"decode_tok_s_batch16_{best}"]
    engine.use_graphs = False
    out["greedy_tokens_eager"] = greedy(model, bank, questions[0], dev)
    out["decode_tok_s_batch1_eager"] = 1e3 / msa_decode(model, bank, questions[:1], 8, dev, 24)
    engine.use_graphs = dev.type == "cuda"
    save()
    print(json.dumps({k: v for k, v in out.items() if "decode" in k}), flush=True)
    if args.only_decode:
        return

    # time to first token: latent (8 documents; then 1M, 10M tokens) and retrieve
    def ttft(q: str) -> float:
        return wall_ms(lambda: model.answer(q, bank, mode="latent", k=8, max_new_tokens=1), dev)

    def retrieve_ms() -> float:
        model.retrieve(questions[0], bank, k=16)
        return statistics.median(wall_ms(lambda q=q: model.retrieve(q, bank, k=16), dev) for q in questions[:8])

    def retrieve_both(label: str) -> None:  # with --compile, also the question forward's plain graph beside it
        out[f"retrieve_ms_{label}"] = retrieve_ms()
        if args.compile:
            engine.set_compile(False)
            out[f"retrieve_ms_{label}_graph"] = retrieve_ms()
            engine.set_compile(True, args.compile_mode)

    def with_int8_keys(label: str) -> None:  # routing.score_keys='int8' on the same bank: retrieve and TTFT
        rc = model.config.routing
        rc.score_keys = "int8"
        ttft(questions[0])
        out[f"latent_ttft_ms_{label}_int8"] = statistics.median(ttft(q) for q in questions[:8])
        out[f"retrieve_ms_{label}_int8"] = retrieve_ms()
        rc.score_keys = "bank"

    ttft(questions[0])
    out["latent_ttft_ms_8docs"] = statistics.median(ttft(q) for q in questions[:8])
    retrieve_both("8docs")
    for size in sizes:
        grow(bank, size)
        label = f"{size // 1_000_000}m" if size >= 1_000_000 else f"{size // 1000}k"
        ttft(questions[0])
        out[f"latent_ttft_ms_{label}"] = statistics.median(ttft(q) for q in questions[:8])
        retrieve_both(label)
        with_int8_keys(label)
        out[f"bank_tokens_{label}"] = bank.info()["tokens"]
        save()
        print(json.dumps({k: v for k, v in out.items() if label in k}), flush=True)
    bank = None  # free the 10M-token bank before transformers loads
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        # 100M tokens: K̄/V̄ alone would be 115 GB (more than this GPU or host holds beside K̄_R), so retrieve
        # is composed: the measured end-to-end retrieve at 1M plus the growth of its bank-sized part
        # (scoring_ms at 100M minus at 1M); at 10M the same composition is checked against the measurement.
        for keys, suffix in (("bank", ""), ("int8", "_int8")):
            grow_ms = {}
            for n in (1_000_000, 10_000_000, 100_000_000):
                grow_ms[n] = scoring_ms(model, n, dev, keys=keys)
                torch.cuda.empty_cache()
            out[f"scoring_ms{suffix}"] = {str(n): v for n, v in grow_ms.items()}
            if f"retrieve_ms_1m{suffix}" in out:
                base = out[f"retrieve_ms_1m{suffix}"] - grow_ms[1_000_000]
                out[f"retrieve_ms_10m_composed{suffix}"] = base + grow_ms[10_000_000]
                out[f"retrieve_ms_100m_composed{suffix}"] = base + grow_ms[100_000_000]
            if f"latent_ttft_ms_1m{suffix}" in out:  # the latent answer's routing reads the same K̄_R
                out[f"latent_ttft_ms_100m_composed{suffix}"] = (out[f"latent_ttft_ms_1m{suffix}"] - grow_ms[1_000_000]
                                                                + grow_ms[100_000_000])
            save()
        out["retrieve_ms_100m_note"] = "composed: retrieve_ms_1m - scoring_ms[1M] + scoring_ms[100M] (_int8: all int8)"
        out["latent_ttft_ms_100m_note"] = "composed: latent_ttft_ms_1m - scoring_ms[1M] + scoring_ms[100M]"
        save()

    # transformers: the same shapes
    hf = hf_model(shape, shape["vocab_size"] or len(tokenizer), dtype, dev)
    hf.model.embed_tokens.weight.copy_(model.backbone.embed_tokens.weight)
    q_ids = tokenizer(questions[0], return_tensors="pt")["input_ids"].to(dev)
    out["hf_eager_decode_ms_batch1"] = hf_eager_decode(hf, q_ids, dev, steps)
    out["hf_eager_decode_tok_s_batch1"] = 1e3 / out["hf_eager_decode_ms_batch1"]
    batch_ids = tokenizer(questions[:16], return_tensors="pt", padding=True)["input_ids"].to(dev)
    out["hf_eager_decode_tok_s_batch16"] = 16e3 / hf_eager_decode(hf, batch_ids, dev, steps)
    out["roofline_tok_s_batch1"] = roofline_tok_s(hf, q_ids.shape[1] + steps, args.hbm_tb_s)
    save()
    rag = "\n\n".join(f"Document [{i + 1}]: {t}" for i, t in enumerate(texts)) + "\n\nQuestion: " + questions[0]
    rag_ids = tokenizer(rag, return_tensors="pt")["input_ids"].to(dev)
    out["text_rag_prompt_tokens"] = rag_ids.shape[1]
    out["text_rag_ttft_ms"] = median_ms(lambda: hf(input_ids=rag_ids, use_cache=True).logits[:, -1].argmax(-1), dev, 5)
    out["hf_forward_tok_s"] = hf_forward_tok_s(hf, tokenizer, texts, doc_tokens, dev)
    save()
    if not args.skip_hf_static and dev.type == "cuda":
        try:
            out["hf_static_compiled_decode_tok_s_batch1"] = 1e3 / hf_static_decode(hf, q_ids, dev, steps)
        except Exception as exc:  # report, keep the rest
            out["hf_static_compiled_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    out["decode_ratio"] = out["decode_tok_s_batch1"] / out["hf_eager_decode_tok_s_batch1"]
    out["ttft_ratio"] = (out.get("latent_ttft_ms_1m", out.get(f"latent_ttft_ms_{sizes[0] // 1000}k", 0))
                         / out["text_rag_ttft_ms"])
    out["encode_ratio"] = out["encode_tok_s"] / out["hf_forward_tok_s"]
    out["retrieve_ms_1m"] = out.get("retrieve_ms_1m")
    out["retrieve_ms_100m"] = out.get("retrieve_ms_100m", out.get("retrieve_ms_100m_composed"))
    save()
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
