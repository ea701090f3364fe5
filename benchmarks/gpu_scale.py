"""GPU scale (issue 8): encode throughput and per-question latency for memory banks of 1M to 100M tokens.

    python benchmarks/gpu_scale.py --part default --sizes 1e6,1e7,1e8 --out benchmarks/results/gpu_scale/default_h100.json
    python benchmarks/gpu_scale.py --part msa4b --sizes 1e6,1e7 --out benchmarks/results/gpu_scale/msa4b_h100.json
    python benchmarks/gpu_scale.py --plot benchmarks/results/gpu_scale        # the figure, from the JSON files (CPU)
    python benchmarks/gpu_scale.py --part default --sizes 2e4 --device cpu     # a CPU smoke run of the whole script

--part default: the embedded SmolLM2-135M-Instruct with its trained router, bf16. Documents are
  concatenations of training passages (--passages, never the eval sets), about 512 tokens each. The bank
  grows to each size by `MSAModel.add` (real encoding: tokenisation, forward, pooling, bank append);
  encode throughput and MFU are measured on that work.
--part msa4b: MSA-4B shapes (Qwen3, 36 layers, 18 routing layers, H=32, Hkv=8, D=128) with random weights
  and the tests' tiny tokenizer. The first size is encoded for real (throughput, MFU); larger banks repeat
  its tensors under new ids (random weights make their content meaningless; routing cost depends on size).

At every size, with the bank tiered (K̄_R on the GPU, K̄/V̄ in pinned host memory, `bank.to(kv="host")`):
- routing: `retrieve(question, k)` wall time per question (tokenise, forward to the last routing layer,
  scores, top-k, ranking), Triton kernel vs PyTorch reference scoring (`routing.kernel`); split into the
  question's forward alone and routing proper (`_route_scores` minus that forward: scores of every layer,
  per-layer top-k, the copy of the scores to the host);
- the routing kernel alone on the bank's own K̄_R (CUDA graph replay, L2 flushed): GPU ms over all routing
  layers and the share of the H100's 3.35 TB/s it reaches;
- flat exact search (the GEMM + top-k that faiss GpuIndexFlatIP runs) over one 384-dim fp16 vector per
  document, MiniLM's width: the embedding retriever's search cost at the same number of documents;
- latent generation: time to first token (routing + prefill with the k documents' compressed memory +
  first token) and decode tokens/s; against text RAG with the same k documents' text in the prompt
  (prefill + first token; its retrieval not counted).
Wall times are medians over the questions (one warm-up question first); EOS is disabled so decode runs
its full length. Results go to JSON after every size (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from msa_core import MSAConfig, MSAModel, __version__, kernels  # noqa: E402
from msa_core.inference.generate import (
    Generation,
    MemoryRouter,
    SamplingParams,
    build_prompt,
    left_pad,
    query_positions,
)
from msa_core.memory.bank import MemoryBank
from msa_core.memory.encoded import EncodedDocuments
from msa_core.inference.generate import HYBRID_INSTRUCTION  # noqa: E402

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
H100_BF16_DENSE = 989.4e12  # FLOP/s, H100 SXM dense bf16 tensor cores
EMBED_DIM = 384  # all-MiniLM-L6-v2
GPU_ENCODE = {"batch_size": 256, "max_tokens_per_batch": 131072}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def passage_pool(train_dir: Path) -> tuple[list[str], list[str]]:
    """Distinct training passages and training questions (shared/data/train; never the eval sets)."""
    passages, questions, seen = [], [], set()
    for f in sorted(train_dir.glob("*.jsonl")):
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                text = row.get("positive", "").strip()
                if text and text not in seen:
                    seen.add(text)
                    passages.append(text)
                if len(questions) < 400 and row.get("query"):
                    questions.append(row["query"])
    return passages, questions


def make_documents(pool: list[str], n: int, chars: int, seed: int) -> list[str]:
    """n documents of about `chars` characters: random training passages joined, each under a unique title."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        parts, size = [f"Record {seed}-{i}."], 0
        while size < chars:
            p = pool[rng.randrange(len(pool))]
            parts.append(p)
            size += len(p)
        out.append(" ".join(parts)[: chars + 200])
    return out


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3


def median_wall_ms(fn_per_item, items, device: torch.device) -> float:
    fn_per_item(items[0])  # warm-up (compiles, caches)
    return statistics.median(wall_ms(lambda x=x: fn_per_item(x), device) for x in items)


def graph_ms(fn, reps: int = 20) -> float:
    """GPU time of `fn`, median ms (kernels_bench.time_graph: CUDA graph replays, L2 flushed before each)."""
    from kernels_bench import med_ms, time_graph

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    return med_ms(time_graph(fn, reps, flush))


def forward_flops_per_token(model: MSAModel, context: float) -> float:
    """Matmul FLOPs of one token's forward through layers 0..last routing layer, plus causal attention
    over `context` tokens on average (the mean position in a document)."""
    a = model.backbone.args
    layers = max(model.layers) + 1
    attn_proj = a.hidden_size * (a.num_heads + 2 * a.kv_heads) * a.head_dim + a.num_heads * a.head_dim * a.hidden_size
    mlp = 3 * a.hidden_size * a.intermediate_size
    attention = 2 * a.num_heads * a.head_dim * context  # QK^T and PV
    return layers * (2 * (attn_proj + mlp) + 2 * attention)


# --------------------------------------------------------------------------------------------
# Measurements at one bank size
# --------------------------------------------------------------------------------------------

def question_forward(model: MSAModel, question: str) -> None:
    """The question's forward up to the last routing layer, no routing: what retrieve() runs besides routing."""
    ids, valid, _ = left_pad([build_prompt(model.tokenizer, question)], 0, model.backbone.device)
    model.backbone(ids, query_positions(valid, 0), valid=valid, last_layer=max(model.layers))


def generate_ms(model: MSAModel, prompt, new_tokens: int, memory=None, offset: int = 0) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    gen = Generation(model.backbone, model.tokenizer, prompt, params, memory=memory, position_offset=offset,
                     eos_ids=())  # EOS off: every run generates `new_tokens`
    return wall_ms(lambda: "".join(gen), model.backbone.device)


def routing_kernel_row(model: MSAModel, bank: MemoryBank, routing_tokens: int) -> dict:
    """Routing of one question of `routing_tokens` tokens against the bank's K̄_R, all layers, as retrieve()
    runs it (one launch of the streaming kernel over every layer): the kernel alone (fast and exact
    precision), the whole scoring path (query prep, kernel, document max), and the PyTorch reference."""
    from msa_core.kernels.routing_triton import group_queries, stream_scores_triton, stream_shape

    a = model.backbone.args
    kr = bank.kr_bar  # [L, C, Hkv, D]
    n_layers = kr.shape[0]
    inv = kernels.inverse_key_norms(kr)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n_layers, 1, routing_tokens, a.num_heads, a.head_dim, device="cuda", generator=gen)
    q = q.to(model.backbone.dtype)
    mask = torch.ones(1, routing_tokens, dtype=torch.bool, device="cuda")
    tp = stream_shape(1, routing_tokens)[1]
    q_rows = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, tp - routing_tokens)).flatten(0, 1)
    mask_rows = torch.nn.functional.pad(mask, (0, tp - routing_tokens)).repeat(n_layers, 1)
    read = kr.numel() * kr.element_size() + inv.numel() * 4
    row = {"routing_tokens": routing_tokens, "layers": n_layers, "kr_bar_bytes": kr.numel() * kr.element_size(),
           "kernel_bytes_read": read}
    for name, exact in (("fast", False), ("exact", True)):
        grouped = group_queries(q_rows, mask_rows, kr.dtype, kr.shape[2], "cosine", exact)
        ms = graph_ms(lambda grouped=grouped, exact=exact: stream_scores_triton(
            grouped, kr, inv, normalize_k=True, reduce_sum=False, exact=exact))
        row[f"kernel_{name}_gpu_ms"] = ms
        row[f"kernel_{name}_fraction_of_h100_peak"] = read / (ms / 1e3) / H100_BANDWIDTH
    row["kernel_gpu_ms"] = row["kernel_fast_gpu_ms"]
    row["kernel_fraction_of_h100_peak"] = row["kernel_fast_fraction_of_h100_peak"]
    row["doc_scores_gpu_ms"] = graph_ms(lambda: kernels.layer_routing_scores(
        q, mask, kr, bank.chunk_doc, bank.num_parts, key_inv_norms=inv, validate=False, exact=False))

    def reference():
        for li in range(n_layers):
            kernels.routing_scores_reference(q[li], mask, kr[li], bank.chunk_doc, bank.num_parts)

    row["reference_doc_scores_ms"] = median_wall_ms(lambda _: reference(), [0, 1, 2], torch.device("cuda"))
    return row


def flat_search_row(n_docs: int, k: int) -> dict:
    """Exact inner-product search of one query over n_docs unit vectors of MiniLM's width (fp16)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n_docs, EMBED_DIM, device="cuda", generator=gen), dim=-1).half()
    q = torch.nn.functional.normalize(torch.randn(1, EMBED_DIM, device="cuda", generator=gen), dim=-1).half()

    def search():
        return torch.topk((emb @ q.T).squeeze(1).float(), min(k, n_docs))

    return {"docs": n_docs, "dim": EMBED_DIM, "gpu_ms": graph_ms(search),
            "eager_ms": median_wall_ms(lambda _: search()[1].cpu(), [0] * 6, torch.device("cuda"))}


def measure(model: MSAModel, bank: MemoryBank, questions: list[str], k: int, ttft_k: int, new_tokens: int) -> dict:
    dev = model.backbone.device
    cuda = dev.type == "cuda"
    tiered = bank.to(dev, kv="host") if cuda else bank
    row: dict = {"documents": len(bank.ids()), "parts": bank.num_parts, "chunks": bank.num_chunks,
                 "tokens": bank.info()["tokens"], "kv_tier": getattr(tiered, "kv_tier", "same")}
    routing = model.config.routing
    row["retrieve_ms"] = median_wall_ms(lambda q: model.retrieve(q, tiered, k=k), questions, dev)
    allowed = tiered.row_mask(None)
    row["question_forward_ms"] = median_wall_ms(lambda q: question_forward(model, q), questions, dev)
    row["route_scores_ms"] = median_wall_ms(lambda q: model._route_scores([q], tiered, allowed), questions, dev)
    row["routing_ms"] = row["route_scores_ms"] - row["question_forward_ms"]
    old = routing.kernel
    routing.kernel = "reference"
    row["retrieve_reference_ms"] = median_wall_ms(lambda q: model.retrieve(q, tiered, k=k), questions[:4], dev)
    routing.kernel = old
    lengths = [sum(build_prompt(model.tokenizer, q).routing) for q in questions]
    if cuda:
        row["routing_kernel"] = routing_kernel_row(model, tiered, round(statistics.median(lengths)))
        row["flat_search_minilm_width"] = flat_search_row(row["documents"], k)

    def latent(q: str, n: int, kk: int) -> float:
        allowed = tiered.row_mask(None)

        def memory(mask, positions):
            return MemoryRouter(tiered, model.router, routing, mask, allowed=allowed, top_k=kk, positions=positions)

        return generate_ms(model, build_prompt(model.tokenizer, q), n, memory, model.position_offset(kk))

    rag_prompts = {}  # text RAG: the same k documents' text in the prompt; retrieval is not timed
    for q in questions:
        hits = model.retrieve(q, tiered, k=ttft_k)
        docs = "\n\n".join(f"Document [{i + 1}]: {h.text}" for i, h in enumerate(hits))
        rag_prompts[q] = build_prompt(model.tokenizer, HYBRID_INSTRUCTION.format(documents=docs, question=q))
    row["latent_ttft_ms"] = median_wall_ms(lambda q: latent(q, 1, k), questions, dev)
    row[f"latent_ttft_k{ttft_k}_ms"] = median_wall_ms(lambda q: latent(q, 1, ttft_k), questions, dev)
    row[f"text_rag_ttft_k{ttft_k}_ms"] = median_wall_ms(lambda q: generate_ms(model, rag_prompts[q], 1), questions, dev)
    row["text_rag_prompt_tokens"] = statistics.median(len(p.ids) for p in rag_prompts.values())
    rates = []  # decode: the same question with 1 and 1 + new_tokens tokens, the difference per token
    for q in questions[:4]:
        first, longer = latent(q, 1, k), latent(q, new_tokens + 1, k)
        rates.append(new_tokens / ((longer - first) / 1e3))
    row["latent_decode_tokens_per_s"] = statistics.median(rates)
    return row


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------

def default_part(args, device: torch.device, result: dict, save) -> None:
    cfg = MSAConfig(encode=GPU_ENCODE if device.type == "cuda" else {})
    t = time.perf_counter()
    model = MSAModel.from_pretrained("default", config=cfg, device=device)
    result["model_load_s"] = time.perf_counter() - t
    result["model"] = "SmolLM2-135M-Instruct + trained router (msa default)"
    pool, questions = passage_pool(Path(args.passages))
    result["passage_pool"] = len(pool)
    questions = random.Random(1).sample(questions, args.questions + 1)
    bank = model.new_bank()
    encoded_s, batch, done = 0.0, 0, 0
    model.add(bank, make_documents(pool, 8, args.doc_chars, seed=999), ids=[f"w{i}" for i in range(8)])
    bank.delete([f"w{i}" for i in range(8)])  # warm-up encode
    for size in args.sizes:
        while bank.info()["tokens"] < size:
            need = size - bank.info()["tokens"]
            n = max(8, min(args.add_docs, int(need / (args.doc_chars / 4.2)) + 1))
            texts = make_documents(pool, n, args.doc_chars, seed=batch)
            ids = [f"d{done + i}" for i in range(n)]
            sync(device)
            t = time.perf_counter()
            model.add(bank, texts, ids=ids, show_progress_bar=False)
            sync(device)
            encoded_s += time.perf_counter() - t
            batch, done = batch + 1, done + n
            print(f"  bank {bank.info()['tokens'] / 1e6:.1f}M tokens, {encoded_s:.0f} s encoding", flush=True)
        tokens = bank.info()["tokens"]
        row = {"target_tokens": size, "encode_s_cumulative": encoded_s, "encode_tokens_per_s": tokens / encoded_s}
        row["encode_mfu"] = row["encode_tokens_per_s"] * forward_flops_per_token(model, args.doc_chars / 4.2 / 2) \
            / H100_BF16_DENSE
        row.update(measure(model, bank, questions, args.k, args.ttft_k, args.new_tokens))
        result["sizes"].append(row)
        report(row)
        save()


def msa4b_part(args, device: torch.device, result: dict, save) -> None:
    import tempfile

    from msa4b_smoke import MSA_4B, TINY, documents, random_backbone, random_router
    from msa_tiny import save_msa_tokenizer
    from transformers import AutoTokenizer

    from msa_core import MSAModel
    tok_dir = Path(tempfile.mkdtemp(prefix="gpu-scale-tok-"))
    save_msa_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    shape = dict(TINY if args.tiny else MSA_4B)
    first, last = (int(x) for x in shape["layers"].split("-"))
    layers = list(range(first, last + 1))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    msa_config = {"router_layer_idx": ",".join(map(str, layers)), "decouple_router": True,
                  "pooling_kernel_size": shape["pooling"],
                  "doc_top_k": 16, "top_k_docs": 16, "head_reduce_method": "mean", "query_reduce_method": "max",
                  "chunk_reduce_method": "max", "aux_loss_method": "INFONCE_DECOUPLE"}
    t = time.perf_counter()
    vocab = shape["vocab_size"] or len(tokenizer)
    model = MSAModel.from_msa_components(random_backbone(shape, vocab, dtype, device), tokenizer, msa_config,
                                               router=random_router(layers, shape, dtype, device), profile="default",
                                               config={"encode": {"batch_size": 64, "max_tokens_per_batch": 32768}},
                                               name="msa-4b-shaped-random")
    result["model_load_s"] = time.perf_counter() - t
    result["model"] = "tiny Qwen3, random weights" if args.tiny else "MSA-4B-shaped Qwen3, random weights"
    doc_tokens = 40 if args.tiny else 512
    n_first = max(8, int(args.sizes[0] / doc_tokens))
    texts = documents(tokenizer, n_first, doc_tokens)
    questions = documents(tokenizer, args.questions + 1, 24, seed=7)
    model.add(model.new_bank(), texts[:8], ids=[f"w{i}" for i in range(8)])  # warm-up
    bank = model.new_bank()
    sync(device)
    t = time.perf_counter()
    model.add(bank, texts, ids=[f"d{i}" for i in range(n_first)], show_progress_bar=False)
    sync(device)
    encoded_s = time.perf_counter() - t
    first_tokens = bank.info()["tokens"]
    base = {n: getattr(bank, n) for n in ("k_bar", "v_bar", "kr_bar")}
    parts = bank.docstore
    for size in args.sizes:
        copies = -(-size // first_tokens) - len(bank.ids()) // len(parts)
        if copies > 0:  # repeat the encoded tensors under new ids, in one add (one copy of the bank)
            start, n = len(bank.ids()), len(parts) * copies
            new_ids = [f"r{start + i}" for i in range(n)]
            bank.add(EncodedDocuments(
                ids=new_ids, parent_ids=new_ids, texts=[p.text for p in parts] * copies, metadatas=[{}] * n,
                n_tokens=[p.n_tokens for p in parts] * copies, n_chunks=[p.n_chunks for p in parts] * copies,
                layers=bank.layers, part_index=[0] * n, **{k: v.repeat(1, copies, 1, 1) for k, v in base.items()}))
        row = {"target_tokens": size, "encoded_tokens": first_tokens, "encode_s": encoded_s,
               "encode_tokens_per_s": first_tokens / encoded_s, "repeated_to_size": size > first_tokens}
        row["encode_mfu"] = row["encode_tokens_per_s"] * forward_flops_per_token(model, doc_tokens / 2) / H100_BF16_DENSE
        row.update(measure(model, bank, questions, args.k, args.ttft_k, args.new_tokens))
        result["sizes"].append(row)
        report(row)
        save()


def report(row: dict) -> None:
    kern = row.get("routing_kernel", {})
    print(f"{row['tokens'] / 1e6:.1f}M tokens, {row['documents']} docs: encode {row.get('encode_tokens_per_s', 0):.0f} "
          f"tok/s (MFU {100 * row.get('encode_mfu', 0):.1f}%); retrieve {row['retrieve_ms']:.1f} ms (reference "
          f"{row['retrieve_reference_ms']:.1f}; question forward {row['question_forward_ms']:.1f}, routing "
          f"{row['routing_ms']:.1f}); kernel {kern.get('kernel_gpu_ms', float('nan')):.3f} ms GPU "
          f"({100 * kern.get('kernel_fraction_of_h100_peak', float('nan')):.0f}% of peak, exact "
          f"{100 * kern.get('kernel_exact_fraction_of_h100_peak', float('nan')):.0f}%); flat search "
          f"{row.get('flat_search_minilm_width', {}).get('gpu_ms', float('nan')):.3f} ms; latent TTFT "
          f"{row['latent_ttft_ms']:.1f} ms, decode {row['latent_decode_tokens_per_s']:.1f} tok/s; TTFT at k="
          f"{[k for k in row if k.startswith('text_rag_ttft')]}: latent "
          f"{[v for k, v in row.items() if k.startswith('latent_ttft_k')]} vs text "
          f"{[v for k, v in row.items() if k.startswith('text_rag_ttft')]} ms", flush=True)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

def plot(folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        rows = run["sizes"]
        x = [r["tokens"] for r in rows]
        label = run["part"]
        axes[0].plot(x, [r["retrieve_ms"] for r in rows], "o-", label=f"{label}: retrieve (Triton)")
        axes[0].plot(x, [r["retrieve_reference_ms"] for r in rows], "x--", label=f"{label}: retrieve (reference)")
        if all("routing_kernel" in r for r in rows):
            axes[1].plot(x, [100 * r["routing_kernel"]["kernel_fraction_of_h100_peak"] for r in rows], "o-",
                         label=f"{label}: routing kernel")
        ttft_key = next(k for k in rows[0] if k.startswith("latent_ttft_k"))
        rag_key = next(k for k in rows[0] if k.startswith("text_rag_ttft"))
        axes[2].plot(x, [r[ttft_key] for r in rows], "o-", label=f"{label}: latent TTFT")
        axes[2].plot(x, [r[rag_key] for r in rows], "x--", label=f"{label}: text RAG TTFT")
    axes[0].set(xscale="log", yscale="log", xlabel="bank tokens", ylabel="ms per question",
                title="Routing latency (retrieve, wall)")
    axes[1].axhline(70, color="grey", lw=0.8, ls=":")
    axes[1].set(xscale="log", xlabel="bank tokens", ylabel="% of 3.35 TB/s", title="Routing kernel bandwidth",
                ylim=(0, 100))
    axes[2].set(xscale="log", xlabel="bank tokens", ylabel="ms", title="Time to first token, same k documents")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    device = runs[0].get("device", "") if runs else ""
    fig.suptitle(f"msa on {device}")
    fig.tight_layout()
    out = folder / "gpu_scale.png"
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["default", "msa4b"], default="default")
    ap.add_argument("--sizes", default="1e6,1e7,1e8", help="bank sizes in tokens, ascending")
    ap.add_argument("--passages", default=str(ROOT.parent / "shared" / "data" / "train"))
    ap.add_argument("--doc-chars", type=int, default=2100, help="characters per document (~512 tokens)")
    ap.add_argument("--add-docs", type=int, default=20000, help="most documents per add call")
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--k", type=int, default=16, help="documents per routing layer (the paper's 16)")
    ap.add_argument("--ttft-k", type=int, default=8, help="k of the latent vs text-RAG time-to-first-token pair")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="msa4b part: tiny shapes (a CPU check of the script)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", metavar="FOLDER", help="only draw the figure from the JSON files in FOLDER")
    args = ap.parse_args()
    if args.plot:
        print(f"wrote {plot(Path(args.plot))}")
        return
    args.sizes = [int(float(s)) for s in args.sizes.split(",")]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_grad_enabled(False)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "gpu_scale" / f"{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "gpu_scale", "part": args.part, "msa_version": __version__, "torch": torch.__version__,
              "python": platform.python_version(), "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "args": {k: v for k, v in vars(args).items() if k != "plot"},
              "h100_peak_bandwidth_Bps": H100_BANDWIDTH, "h100_bf16_dense_flops": H100_BF16_DENSE, "sizes": []}
    t0 = time.perf_counter()

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(result, indent=2) + "\n")

    (default_part if args.part == "default" else msa4b_part)(args, device, result, save)
    save()
    print(f"wrote {out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
