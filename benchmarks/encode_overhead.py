"""Does fusing chunk pooling into encoding pay? (issue 8, kernels item c). Not run in CI.

    python benchmarks/encode_overhead.py --out benchmarks/results/encode_overhead_h100.json

A SmolLM2-135M-shaped model (random weights, bf16; the default model's shapes) encodes random-token
documents of 512 tokens in batches of 256 (the GPU batch gpu_scale.py uses). Timed per batch, medians:
- forward: the backbone to the last routing layer, nothing captured (the floor any encoder pays);
- forward + capture: the same pass with the encoder's capture hook (pooling K, V and the normed
  hidden state of each routing layer into chunk means), plus the routing keys W_KR . mean(x);
- encode_parts: the library's whole stage 1 on the same documents (batching, pooling, moving the
  pooled tensors to the host). The gap forward -> forward + capture is what a fused pooling kernel
  could at best remove.
For the 5 routing layers of the shipped router and the 15 of the upper half.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from msa_core import MSAConfig, MSAModel, __version__  # noqa: E402
from msa_core.inference.encode import DocumentPart, _Pooler, _routing_keys, encode_parts


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encode_overhead_h100.json"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("encode_overhead.py needs a CUDA GPU")
    from gpu_smoke import smollm2_shaped_checkpoint

    torch.set_grad_enabled(False)
    path = smollm2_shaped_checkpoint(Path(tempfile.mkdtemp(prefix="encode-overhead-")))
    result = {"benchmark": "encode_overhead", "msa_version": __version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(), "batch": args.batch, "doc_tokens": args.tokens, "rows": []}
    gen = torch.Generator().manual_seed(0)
    for layers in ([7, 18, 24, 28, 29], list(range(15, 30))):
        cfg = MSAConfig(routing={"layers": layers},
                        encode={"batch_size": args.batch, "max_tokens_per_batch": args.batch * args.tokens})
        model = MSAModel.from_pretrained(str(path), config=cfg, device="cuda")
        bb, router, dev = model.backbone, model.router, model.backbone.device
        ids = torch.randint(10, 40000, (args.batch, args.tokens), generator=gen).to(dev)
        pos = torch.arange(args.tokens, device=dev).expand_as(ids)
        lens = torch.full((args.batch,), args.tokens, device=dev)

        def forward():
            bb(ids, pos, last_layer=max(layers))

        def forward_capture():
            pooler = _Pooler(layers, lens, cfg.encode.chunk_size)
            bb(ids, pos, capture=pooler, last_layer=max(layers))
            return {layer: _routing_keys(router, layer, pooler) for layer in layers}

        parts = [DocumentPart(f"d{i}", f"d{i}", 0, "", ids[i].tolist(), {}) for i in range(args.batch)]

        def stage1():
            encode_parts(bb, router, layers, parts, cfg.encode, show_progress_bar=False)

        tokens = args.batch * args.tokens
        row = {"routing_layers": layers}
        for name, fn in (("forward", forward), ("forward_capture", forward_capture), ("encode_parts", stage1)):
            s = timed(fn, args.reps)
            row[f"{name}_s"], row[f"{name}_tokens_per_s"] = s, tokens / s
        row["capture_overhead"] = row["forward_capture_s"] / row["forward_s"] - 1
        row["encode_parts_overhead"] = row["encode_parts_s"] / row["forward_s"] - 1
        result["rows"].append(row)
        print(f"{len(layers)} routing layers: forward {row['forward_tokens_per_s'] / 1e3:.0f}K tok/s, + capture "
              f"{row['forward_capture_tokens_per_s'] / 1e3:.0f}K ({100 * row['capture_overhead']:+.0f}%), "
              f"encode_parts {row['encode_parts_tokens_per_s'] / 1e3:.0f}K ({100 * row['encode_parts_overhead']:+.0f}%)",
              flush=True)
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
