"""`msa train-router`: train router projectors on (question, positive) pairs (msa_core.training)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .common import float_in, positive_int, say


def cmd_train_router(args: argparse.Namespace) -> int:
    import torch

    from ..training.run import train_router
    from ..training.trainer import TrainConfig

    fields = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "warmup_steps": args.warmup_steps, "tau": args.tau,
              "hard_negatives": args.hard_negatives, "bm25_depth": args.bm25_depth, "eval_every": args.eval_every,
              "heldout_fraction": args.heldout, "seed": args.seed, "max_layers": args.max_layers,
              "max_per_source": args.max_per_source, "precision": args.precision, "needles": args.needles,
              "precondition": args.precondition, "span_pairs": args.span_pairs,
              "pair_questions": args.pair_questions,
              "tune_from_layer": args.tune_from_layer, "lora_rank": args.lora_rank, "adapter_lr": args.adapter_lr,
              "lm_weight": args.lm_weight, "recompute": args.recompute or None,
              "teacher_weight": args.teacher_weight, "teacher_tau": args.teacher_tau,
              "checkpoint_every": args.checkpoint_every,
              "heldout_sources": args.heldout_sources.split(",") if args.heldout_sources else None}
    try:
        config = TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:
        raise InvalidInputError(f"bad training setting: {exc}") from exc
    overrides: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    if args.layers:
        routing["layers"] = [int(x) for x in args.layers.split(",")]
    if args.query_reduce:
        routing["query_reduce"] = args.query_reduce
    if routing:
        overrides["routing"] = routing
    if args.chunk_size:
        overrides["encode"] = {"chunk_size": args.chunk_size}
    from ..model import MSAModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda, but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # the cached states need no more than TF32's precision
    # float32 weights, so the states (and the backbone fingerprint the router records) equal the CPU model's
    model = MSAModel.from_pretrained(args.model, router=args.router or "native", config=overrides or None, device=device,
                                     dtype=torch.float32)
    say(f"training the router of {args.model} on {device}: layers {model.layers}")
    report = train_router(model, args.data, args.out, config, checkpoint_dir=args.checkpoint_dir,
                          resume=args.resume, log=say, show_progress_bar=not args.no_progress)
    final = report.final
    if final:
        say(f"held-out recall@1/5/10: {final['recall@1']:.3f} / {final['recall@5']:.3f} / {final['recall@10']:.3f}")
    say(f"router written to {args.out} (model card {Path(args.out).with_suffix('.md')}) in {report.seconds} s")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
    return 0


def register(command: Any) -> None:
    p = command("train-router", cmd_train_router, "Train router projectors (W_QR, W_KR) on (query, positive) "
                "pairs with the backbone frozen (decoupled InfoNCE, paper Eq. 5); writes a router .safetensors "
                "and a model card beside it.")
    p.add_argument("data", nargs="+", help="JSONL files: query, positive, optional negatives (list), title, source")
    p.add_argument("--out", required=True, metavar="FILE", help="router file to write (.safetensors)")
    p.add_argument("--model", default="default", help="'default' or a local Llama/Qwen2/Qwen3 folder")
    p.add_argument("--router", default=None, help="starting router: native (default), random, or a .safetensors file")
    p.add_argument("--layers", help="routing layers to train, comma-separated (default: the upper half)")
    p.add_argument("--query-reduce", choices=("max", "mean", "last", "colbert"),
                   help="how question tokens meet a document's chunks in training and, recorded in the router file, "
                   "at retrieval: max (paper Eq. 2, the default), or colbert (each token's best chunk, then the mean "
                   "over tokens)")
    p.add_argument("--chunk-size", type=positive_int, help="tokens pooled per routing key (P) in training and, "
                   "recorded in the router file, in the banks built with it (default: the model's, 64)")
    p.add_argument("--max-layers", type=positive_int, help="keep the best N layers, chosen on held-out data")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (default: 1500)")
    p.add_argument("--batch-size", type=positive_int, help="questions per step (default: 256)")
    p.add_argument("--lr", type=float_in(0.0, 1.0, low_open=True), help="peak learning rate (default: 5e-4)")
    p.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up (default: 100)")
    p.add_argument("--tau", type=float_in(0.0, 0.5, low_open=True), help="InfoNCE temperature (default: 0.1)")
    p.add_argument("--hard-negatives", type=int, help="mined negatives per question per step (default: 3)")
    p.add_argument("--bm25-depth", type=int, help="BM25 hits kept as hard negatives, 0 for none (default: 30)")
    p.add_argument("--heldout", type=float_in(0.0, 0.99), help="share of documents held out (default: 0.02)")
    p.add_argument("--heldout-sources", metavar="S1,S2", help="hold these sources out whole (their 'source' "
                   "field or file name): a domain the router never sees")
    p.add_argument("--eval-every", type=positive_int, help="held-out evaluation interval in steps (default: 250)")
    p.add_argument("--max-per-source", type=positive_int, help="cap on questions per source (data mix)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default: auto (bf16 autocast on GPU)")
    p.add_argument("--needles", type=int, help="add N synthetic needle-lookup questions built from the training "
                   "documents (default: 0)")
    p.add_argument("--span-pairs", type=int, help="add N self-supervised questions: a few words cut from a "
                   "training document, answered by it (default: 0)")
    p.add_argument("--pair-questions", type=int, help="add N self-supervised two-document questions: the words "
                   "around a name in each of two training documents, answered by both (default: 0)")
    p.add_argument("--tune-from-layer", type=positive_int, metavar="F", help="also train the backbone's layers from "
                   "F up, as LoRA adapters saved in the router file and merged at load (default: frozen backbone)")
    p.add_argument("--lora-rank", type=positive_int, help="rank of those adapters (default: 32)")
    p.add_argument("--adapter-lr", type=float, help="peak learning rate of the adapters (default: 5e-4)")
    p.add_argument("--lm-weight", type=float, help="weight of the next-token loss that keeps the tuned backbone a "
                   "language model (default: 0.1)")
    p.add_argument("--recompute", action="store_true", help="with --tune-from-layer: recompute the tuned layers' "
                   "activations in the backward pass (about a third slower, far less memory)")
    p.add_argument("--precondition", choices=("none", "standardize", "whiten"),
                   help="train on conditioned states and fold the map into the saved router (default: standardize)")
    p.add_argument("--teacher-weight", type=float, help="weight of the listwise distillation loss on questions whose "
                   "lines carry teacher scores (msa distill-data writes them; default: 0, none)")
    p.add_argument("--teacher-tau", type=float, help="temperature of the teacher's softmax (default: 0.05)")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write checkpoints here (step-N/ and LATEST)")
    p.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints (default: 500, and "
                   "always the last step)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--report", metavar="FILE", help="also write the training report (history, metrics) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
