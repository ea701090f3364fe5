"""Smoke run of the reference profile with an MSA-4B-shaped model (random weights, built in memory).

    python benchmarks/msa4b_smoke.py --out benchmarks/results/msa4b_smoke_h100.json      # one GPU, bf16
    python benchmarks/msa4b_smoke.py --tiny --out /tmp/msa4b_tiny.json                  # CPU check

Shape (spec §1.1): Qwen3, 36 layers, hidden 2560, 32 q / 8 kv heads, head_dim 128, intermediate 9728,
vocab 151936, tied embeddings; msa_config: routing layers 18-35, decouple_router, INFONCE_DECOUPLE,
P=64, doc_top_k=16. The weights (~8.3 GB in bf16) are drawn on the device, never written to disk; the
tokenizer is the tests' tiny BPE (its ids cover only the first few hundred rows of the embedding).
Phases, each timed with its peak GPU memory: build, encode (200 docs x ~512 tokens by default),
retrieve (routing only), latent answer (reference first call, N new tokens), interleave (one forced
retrieval round: the model "names" two documents, they are injected and the prompt is re-prefilled and
re-routed, then it "ends retrieval" and generates N tokens after the re-prompt).
End-of-sequence is disabled so every generation runs its full N tokens.
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from msa_tiny import save_msa_tokenizer  # noqa: E402

from msa_core import (
    MSAModel,  # noqa: E402
    __version__,  # noqa: E402
)
from msa_core.decoder.backbone import Backbone, BackboneArgs
from msa_core.decoder.rope import RopeSpec, RotaryEmbedding
from msa_core.inference.generate import SamplingParams
from msa_core.inference.interleave import (
    END_OF_RETRIEVE,
    OBJECT_REF_END,
    InterleaveMachine,
    ModelBackend,
    run_interleave,
)
from msa_core.routing.projectors import RouterProjectors

MSA_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
              kv_heads=8, head_dim=128, rope_theta=5e6, max_pos=262144, layers="18-35", pooling=64, top_k=16)
TINY = dict(vocab_size=0, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, kv_heads=2,
            head_dim=32, rope_theta=1e6, max_pos=4096, layers="2-3", pooling=4, top_k=2)


def random_backbone(shape: dict, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Backbone:
    """A Qwen3 backbone with N(0, 0.02) weights drawn directly on `device` in `dtype` (norms = 1)."""
    args = BackboneArgs(family="qwen3", vocab_size=vocab, hidden_size=shape["hidden_size"],
                        intermediate_size=shape["intermediate_size"], num_layers=shape["num_layers"],
                        num_heads=shape["num_heads"], kv_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                        rms_norm_eps=1e-6, rope=RopeSpec(theta=shape["rope_theta"], dim=shape["head_dim"],
                                                         max_position_embeddings=shape["max_pos"]),
                        qk_norm=True, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Backbone(args)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if module is model.lm_head:
            continue  # tied to the embedding below
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if name == "weight" and p.dim() == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(args.rope)
    return model.eval()


def random_router(layers: list[int], shape: dict, dtype: torch.dtype, device: torch.device) -> RouterProjectors:
    gen = torch.Generator(device=device).manual_seed(1)
    h, d, kv, hidden = shape["num_heads"], shape["head_dim"], shape["kv_heads"], shape["hidden_size"]
    weights = {i: (torch.empty(h * d, hidden, dtype=dtype, device=device).normal_(0, 0.02, generator=gen),
                   torch.empty(kv * d, hidden, dtype=dtype, device=device).normal_(0, 0.02, generator=gen))
               for i in layers}
    return RouterProjectors(weights, h, kv, d, init_mode="random")


def documents(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """Texts of about `tokens` tokens each, decoded from random ids of the tiny tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    specials = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in specials]
    out = []
    for _ in range(n):
        pick = torch.randint(0, len(ids), (tokens,), generator=gen).tolist()
        text = tokenizer.decode([ids[i] for i in pick]).replace("<|", "< |")
        again = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]  # re-tokenizing merges differ
        out.append(tokenizer.decode(again))
    return out


class Phases:
    def __init__(self, cuda: bool) -> None:
        self.cuda, self.result = cuda, {}

    def run(self, name: str, fn, repeats: int = 1):
        times, out = [], None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        self.result[f"{name}_s"] = statistics.median(times)
        if self.cuda:
            self.result[f"{name}_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32 (for a CPU check)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--docs", type=int, default=None, help="documents (default: 200; --tiny: 12)")
    ap.add_argument("--doc-tokens", type=int, default=None, help="tokens per document (default: 512; --tiny: 40)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="default: bfloat16 on CUDA (float32 with --tiny or on CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "msa4b_smoke.json"))
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shape = TINY if args.tiny else MSA_4B
    dtype = torch.float32 if args.tiny or not cuda else torch.bfloat16
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    n_docs = args.docs or (12 if args.tiny else 200)
    doc_tokens = args.doc_tokens or (40 if args.tiny else 512)
    torch.set_grad_enabled(False)

    from transformers import AutoTokenizer

    tok_dir = Path(tempfile.mkdtemp(prefix="msa4b-tok-"))
    save_msa_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = shape["vocab_size"] or len(tokenizer)
    first, last = (int(x) for x in shape["layers"].split("-"))
    layers = list(range(first, last + 1))
    msa_config = {"router_layer_idx": ",".join(map(str, layers)), "decouple_router": True,
                  "pooling_kernel_size": shape["pooling"], "doc_top_k": shape["top_k"], "top_k_docs": shape["top_k"],
                  "head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max",
                  "aux_loss_method": "INFONCE_DECOUPLE"}
    phases = Phases(cuda)

    def build():
        backbone = random_backbone(shape, vocab, dtype, device)
        router = random_router(layers, shape, dtype, device)
        return MSAModel.from_msa_components(backbone, tokenizer, msa_config, router=router, eos_ids=(),
                                            config={"encode": {"batch_size": 32, "max_tokens_per_batch": 32 * 640}},
                                            name="msa-4b-shaped-random" if not args.tiny else "tiny-random")

    model = phases.run("build", build)
    params = sum(p.numel() for p in model.backbone.parameters()) + sum(
        t.numel() for t in model.router.state_dict_msa().values())
    phases.run("template", lambda: model.reference.template())
    texts = documents(tokenizer, n_docs, doc_tokens)
    model.index(texts[:4], ids=[f"w{i}" for i in range(4)], show_progress_bar=False)  # warm-up
    bank = phases.run("encode", lambda: model.index(texts, ids=[f"d{i}" for i in range(n_docs)],
                                                     show_progress_bar=False))
    info = bank.info()
    question = "Who built the lighthouse of Velmora?"
    phases.run("retrieve", lambda: model.retrieve(question, bank, k=5), repeats=3)
    n = args.new_tokens
    latent = phases.run("latent_answer", lambda: model.answer(question, bank, max_new_tokens=n), repeats=2)

    def interleave():
        a, b = 3 % n_docs, 7 % n_docs
        forced = tokenizer(f"[{a}][{b}]{OBJECT_REF_END}{END_OF_RETRIEVE}", add_special_tokens=False)["input_ids"]
        numbers = model.reference.documents_by_index(bank)
        texts_by_id = {d["id"]: d["text"] for d in bank.get(list(numbers.values()))}
        machine = InterleaveMachine(question, {i: texts_by_id[p] for i, p in numbers.items()})
        backend = ModelBackend(model, bank, model.config.routing.top_k, SamplingParams(max_new_tokens=n),
                               forced=list(forced))
        "".join(run_interleave(machine, backend, n))
        return machine, backend

    machine, backend = phases.run("interleave", interleave)
    r = phases.result
    result = {
        "benchmark": "msa4b_smoke", "msa_version": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "model": "tiny" if args.tiny else "MSA-4B-shaped, random weights",
        "params": params, "weights_gb": params * torch.finfo(dtype).bits / 8 / 2**30,
        "routing_layers": layers, "chunk_size": shape["pooling"], "top_k": shape["top_k"],
        "template_tokens": model.reference.template_length,
        "docs": n_docs, "bank_tokens": info["tokens"], "bank_chunks": info["chunks"], "bank_bytes": info["bytes"],
        "encode_tokens_per_s": info["tokens"] / r["encode_s"],
        "latent_new_tokens": n, "latent_tokens_per_s_incl_prefill": n / r["latent_answer_s"],
        "latent_layer_selections_distinct_docs": len({d for v in latent.layer_selections.values() for d in v}),
        "interleave_rounds": machine.rounds, "interleave_prefills": len(backend.prefills),
        "interleave_prefill_tokens": [len(p.prompt.ids) for p in backend.prefills],
        "interleave_finish_reason": machine.finish_reason,
        **r,
        "note": "reference profile, plain-PyTorch path (no Triton kernels); bank in host memory, so routing copies "
                "K̄_R to the device per routing layer; EOS disabled; interleave outputs forced for one round",
    }
    if cuda:
        result["peak_gpu_gb"] = max(v for k, v in r.items() if k.endswith("_peak_gpu_gb"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
