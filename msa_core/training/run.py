"""The whole training job: read the data, cache the backbone's states (or prepare the tuned trainer),
train, and save the router with its model card. `msa train-router` calls `train_router`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import TRAINED_ENCODE, TRAINED_SCORING
from ..routing.projectors import RouterProjectors
from .cache import RaggedStates, cache_documents, cache_queries
from .data import TrainingSet
from .precondition import condition
from .trainer import (
    RouterTrainer,
    TrainConfig,
    TrainReport,
    choose_layers,
    evaluate,
    heldout_needles,
    read_training_data,
)
from .tuned import prepare_tuned_trainer


def prepare_trainer(model: Any, data: Sequence[str | Path], config: TrainConfig, *,
                    checkpoint_dir: str | Path | None = None, log: Any = print,
                    show_progress_bar: bool | None = None) -> tuple[RouterTrainer, dict[str, Any]]:
    """Read and split the pairs, mine BM25 negatives, cache the frozen backbone's states and start from
    a float32 copy of the model's router. Returns the trainer and {"sources", "timings"}."""
    c = config
    if c.tune_from_layer is not None:
        return prepare_tuned_trainer(model, data, c, checkpoint_dir=checkpoint_dir, log=log,
                                     show_progress_bar=show_progress_bar)
    full, train, heldout, timings = read_training_data(data, c, log)

    layers, enc = list(model.layers), model.config.encode
    bb, tok = model.backbone, model.tokenizer
    offset = model.position_offset(model.config.routing.top_k)

    def states(ts: TrainingSet) -> tuple[RaggedStates, RaggedStates]:
        docs = cache_documents(bb, tok, ts.documents, layers, chunk_size=enc.chunk_size,
                               max_doc_tokens=enc.max_doc_tokens, batch_size=256,
                               max_tokens_per_batch=c.cache_batch_tokens, show_progress_bar=show_progress_bar)
        qs = cache_queries(bb, tok, ts.queries, layers, position_offset=offset, batch_size=256,
                           max_tokens_per_batch=c.cache_batch_tokens, show_progress_bar=show_progress_bar)
        return qs, docs

    t = time.perf_counter()
    tq, td = states(train)
    hq, hd = states(heldout) if len(heldout) else (None, None)
    timings["cache"] = round(time.perf_counter() - t, 2)
    log(f"cached {td.x.shape[0]} document chunks and {tq.x.shape[0]} question tokens in {timings['cache']} s")

    router = model.router.copy(layers, dtype=torch.float32, device=bb.device,
                               init_mode=f"trained-from-{model.router.init_mode}")
    pre = condition(router, layers, c.precondition, [tq, hq], [td, hd], seed=c.seed)
    trainer = RouterTrainer(router, layers, train, tq, td, heldout if len(heldout) else None, hq, hd, c,
                            model.config.routing, checkpoint_dir=checkpoint_dir, log=log)
    return trainer, {"sources": full.source_counts(), "timings": timings, "preconditioner": pre}


def train_router(model: Any, data: Sequence[str | Path], out: str | Path, config: TrainConfig | None = None, *,
                 checkpoint_dir: str | Path | None = None, resume: bool = False, log: Any = print,
                 show_progress_bar: bool | None = None) -> TrainReport:
    """Train `model`'s routing layers on JSONL pairs and write the router to `out` (safetensors, with
    a model card `out`.md beside it). Starts from the model's own router. The backbone stays frozen, unless
    config.tune_from_layer is set: then adapters of its upper layers are trained too and saved in the
    router file (`model` itself is left as it was)."""
    c = config or TrainConfig()
    t0 = time.perf_counter()
    trainer, prep = prepare_trainer(model, data, c, checkpoint_dir=checkpoint_dir, log=log,
                                    show_progress_bar=show_progress_bar)
    try:
        return _train_and_save(model, data, out, c, trainer, prep, t0, resume, log)
    finally:
        if c.tune_from_layer is not None:
            from ..decoder.lora import remove

            remove(model.backbone)


def _train_and_save(model: Any, data: Sequence[str | Path], out: str | Path, c: TrainConfig, trainer: RouterTrainer,
                    prep: dict[str, Any], t0: float, resume: bool, log: Any) -> TrainReport:
    timings = prep["timings"]
    router, layers, heldout = trainer.router, trainer.layers, trainer.heldout
    if resume and trainer.load_checkpoint():
        log(f"resumed at step {trainer.step}")
    t = time.perf_counter()
    if trainer.step == 0 and heldout is not None:
        trainer.history.append({"step": 0, "heldout": trainer.evaluate_heldout()})
        log(json.dumps(trainer.history[-1]))
    trainer.run()
    timings["train"] = round(time.perf_counter() - t, 2)

    chosen = layers
    final: dict[str, Any] = {}
    if heldout is not None:
        (hq, hd), routing = trainer.heldout_states(), model.config.routing
        final["all_layers"] = evaluate(router, layers, hq, hd, heldout.positives, routing)
        if c.max_layers:
            chosen = choose_layers(router, layers, hq, hd, heldout.positives, routing, c.max_layers)
            log(f"kept layers {chosen}")
        final.update(evaluate(router, chosen, hq, hd, heldout.positives, routing, state_layers=layers))
        final["heldout_documents"] = len(heldout.documents)
    held_queries, held_docs = (len(heldout), len(heldout.documents)) if heldout is not None else (0, 0)
    report = TrainReport(steps=trainer.step, seconds=round(time.perf_counter() - t0, 2),
                         device=_device_name(model.backbone.device), layers=chosen,
                         train_queries=len(trainer.train), train_documents=len(trainer.train.documents),
                         heldout_queries=held_queries, heldout_documents=held_docs, sources=prep["sources"],
                         history=trainer.history, final=final, timings=timings)
    saved = router.copy(chosen, dtype=torch.float32, device="cpu")
    if prep.get("preconditioner") is not None:
        prep["preconditioner"].fold(saved)  # the trainer's router reads conditioned states; the saved one raw
    saved.backbone_delta, saved.delta_scale = trainer.backbone_delta()
    save_trained_router(saved, out, model, c, report,
                        [str(p) for p in data])
    return report


def save_trained_router(router: RouterProjectors, out: str | Path, model: Any, config: TrainConfig,
                        report: TrainReport, data: Sequence[str]) -> Path:
    """The router as safetensors (fp16 weights; training summary in its metadata) and a model card."""
    out = Path(out)
    half = router.copy(dtype=torch.float16)
    # A router with a delta is checked against the backbone before the delta is merged. When training started
    # from a tuned router, the model keeps those base weights as its generator: record their fingerprint.
    base_fingerprint = (model.backbone_fingerprint if model.generator is model.backbone
                        else model.generator.fingerprint())
    summary = {"final": report.final, "steps": report.steps, "seconds": report.seconds, "device": report.device,
               "data": [Path(d).name for d in data], "config": config.model_dump()}
    routing = model.config.routing
    scoring = {k: getattr(routing, k) for k in TRAINED_SCORING}
    encode = {k: getattr(model.config.encode, k) for k in TRAINED_ENCODE}
    half.save(out, base_fingerprint, extra={"training": summary, "routing": scoring, "encode": encode})
    out.with_suffix(".md").write_text(model_card(report, config, data, model.name))
    return out


def model_card(report: TrainReport, config: TrainConfig, data: Sequence[str], model_name: str) -> str:
    f = report.final
    tuned = config.tune_from_layer is not None
    lines = [f"# Router for `{model_name}`", "",
             "Router projectors (W_QR, W_KR) trained "
             + ("together with adapters of the backbone's upper layers" if tuned else "with the backbone frozen")
             + f": decoupled InfoNCE (paper Eq. 5, tau={config.tau}) over per-layer document scores, in-batch "
             "negatives plus " + ("BM25-mined" if tuned else "BM25-mined and router-mined") + " hard negatives.", "",
             "## Data", "",
             f"- files: {', '.join(Path(d).name for d in data)}",
             f"- {report.train_queries} training questions over {report.train_documents} documents; "
             f"{report.heldout_queries} held-out questions over {report.heldout_documents} documents "
             f"(split by document, no document in both; {config.heldout_fraction:.1%} of documents"
             + (f", plus the whole sources {', '.join(config.heldout_sources)}" if config.heldout_sources else "")
             + ")",
             f"- questions per source, before the split: {json.dumps(report.sources)}"]
    synthetic = ([f"{config.needles} in the needle format (train_data.add_needle_pairs; "
                  f"{heldout_needles(config)} to the held-out split too)"] if config.needles else []) \
        + ([f"{config.span_pairs} span questions (train_data.add_span_pairs)"] if config.span_pairs else []) \
        + ([f"{config.pair_questions} two-document questions (train_data.add_pair_questions)"]
           if config.pair_questions else [])
    if synthetic:
        lines.append(f"- synthetic questions added to the training split: {', '.join(synthetic)}")
    lines += ["", "## Training", "",
             f"- {report.steps} steps of {config.batch_size} questions, lr {config.lr}, "
             f"{config.hard_negatives} hard negatives per question, seed {config.seed}",
             "- states preconditioned: no (the tuned layers' states move during training)" if tuned else
             f"- states preconditioned: {config.precondition}"
             + ("" if config.precondition == "none" else " (trained on S·x; the saved weights are W = V·S, "
                "see msa_core/train_precondition.py)"),
             f"- device: {report.device}; {report.seconds} s in all ({json.dumps(report.timings)})",
             f"- routing layers: {report.layers}"]
    if tuned:
        lines.append(f"- backbone tuned too: rank-{config.lora_rank} adapters of every projection from layer "
                     f"{config.tune_from_layer} up (adapter lr {config.adapter_lr}, LM loss weight {config.lm_weight}), "
                     "carried in this file and merged into the backbone at load (msa_core/lora.py)")
    lines += ["",
             "## Held-out metrics (questions ranked against all held-out documents)", ""]
    if f:
        lines += ["| recall@1 | recall@5 | recall@10 |", "|---:|---:|---:|",
                  f"| {f['recall@1']:.3f} | {f['recall@5']:.3f} | {f['recall@10']:.3f} |", "",
                  f"Per-layer recall@5: {json.dumps(f['per_layer_recall@5'])}"]
        every = f["all_layers"]
        lines += ["", f"All {len(every['per_layer_recall@5'])} trained layers together: recall@1 {every['recall@1']:.3f}, "
                      f"recall@5 {every['recall@5']:.3f}, recall@10 {every['recall@10']:.3f}"]
        start = next((h["heldout"] for h in report.history if h.get("step") == 0 and "heldout" in h), None)
        if start:
            lines += ["", f"Before training (same router start): recall@1 {start['recall@1']:.3f}, "
                          f"recall@5 {start['recall@5']:.3f}, recall@10 {start['recall@10']:.3f}"]
    else:
        lines.append("No held-out split was kept (heldout_fraction=0).")
    return "\n".join(lines) + "\n"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
