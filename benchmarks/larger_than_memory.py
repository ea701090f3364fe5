"""A bank larger than the process may hold, queried from the memory-mapped disk tier (issue 24, item 6).

    python benchmarks/larger_than_memory.py            # 5M tokens, default model; writes the JSON below
    python benchmarks/larger_than_memory.py --tokens 200000 --out /tmp/ltm.json   # a quick look

1. build (no limit): the default model's bank (its 15 routing layers, 3 KV heads of 64, chunks of 64
   tokens, float16), grown batch by batch through the public `MemoryBank.add`. Documents are synthetic:
   2,048 tokens each with seeded random pooled tensors (no encoding: 5M tokens through the CPU encoder
   would take hours here), plus one real document encoded by the model, whose sentence is asked later.
   Saved half-way and at the end, as a user adding to a bank would.
2. query (a fresh process, under RLIMIT_DATA): after the model is loaded, the process's data limit is
   set to what it uses then + K̄_R (routing reads all of it, so it is resident) + --headroom MB. That is
   less than K̄/V̄ alone. The bank is loaded with kv="disk" (K̄/V̄ stay in the file; pages are read when
   touched), the real document's sentence is asked (retrieve, top 5) and answered (latent, 8 tokens).
   Peak RSS (VmHWM) is reported.
3. control (a fresh process, the same limit): loading the same bank with kv="same" (all in memory) must
   fail: the limit is real, and the disk tier is what made the query fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

NEEDLE = ("Serial number 80417 is engraved on the brass lantern of the Greyhook lighthouse, "
          "which the keeper Esme polishes on the first frost.")
QUESTION = "Which object carries serial number 80417?"
DOC_TOKENS = 2048


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def build(model, path: Path, tokens: int, batch_docs: int = 200) -> dict:
    import torch

    from msa_core.memory.encoded import EncodedDocuments

    bank = model.new_bank()
    model.add(bank, [NEEDLE], ["needle"])
    chunk = bank.config.encode.chunk_size
    n_docs = -(-tokens // DOC_TOKENS)
    per_doc = DOC_TOKENS // chunk
    g = torch.Generator().manual_seed(24)
    started, saves = time.perf_counter(), []
    for first in range(0, n_docs, batch_docs):
        ids = [f"synthetic-{i}" for i in range(first, min(first + batch_docs, n_docs))]
        shape = (len(bank.layers), len(ids) * per_doc, bank.kv_heads, bank.head_dim)
        # the scale of real pooled keys/values of this model is ~1; random unit-variance rows stand in
        k, v, kr = (torch.randn(shape, generator=g, dtype=torch.float16) for _ in range(3))
        bank.add(EncodedDocuments(ids=ids, parent_ids=ids, part_index=[0] * len(ids),
                                  texts=[f"Synthetic document {i}." for i in ids], metadatas=[{}] * len(ids),
                                  n_tokens=[DOC_TOKENS] * len(ids), n_chunks=[per_doc] * len(ids),
                                  layers=bank.layers, k_bar=k, v_bar=v, kr_bar=kr))
        if first + batch_docs >= n_docs // 2 and not saves:
            t = time.perf_counter()
            bank.save(path)
            saves.append(round(time.perf_counter() - t, 1))
    t = time.perf_counter()
    bank.save(path)
    saves.append(round(time.perf_counter() - t, 1))
    info = bank.info()
    kv_bytes = 2 * bank.k_bar.numel() * bank.k_bar.element_size()
    return {"documents": info["documents"], "tokens": info["tokens"], "chunks": info["chunks"],
            "kv_bytes": kv_bytes, "kr_bytes": bank.kr_bar.numel() * bank.kr_bar.element_size(),
            "layers": len(bank.layers), "kv_heads": bank.kv_heads, "head_dim": bank.head_dim, "chunk_size": chunk,
            "storage_dtype": info["storage_dtype"], "build_s": round(time.perf_counter() - started, 1),
            "save_s": saves, "builder_peak_rss_mb": round(status_kb("VmHWM") / 1024, 1)}


def memory_mb() -> dict:
    """Private memory (RssAnon) and mapped file pages (RssFile: clean page cache, dropped under pressure)."""
    return {k: round(status_kb(k) / 1024, 1) for k in ("RssAnon", "RssFile")}


def query(model, path: Path, kv: str, kr_bytes: int, headroom_mb: int) -> dict:
    data_now = status_kb("VmData") * 1024
    limit = data_now + kr_bytes + headroom_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    out = {"kv": kv, "data_limit_bytes": limit, "data_before_load_bytes": data_now}
    before = memory_mb()
    try:
        t = time.perf_counter()
        bank = model.load_bank(path, kv=kv)
        out["load_s"] = round(time.perf_counter() - t, 1)
        out["memory_after_load_mb"] = memory_mb()
        t = time.perf_counter()
        found = model.retrieve(QUESTION, bank, 5)
        out["retrieve_s"] = round(time.perf_counter() - t, 2)
        out["top5"] = [d.id for d in found]
        out["needle_rank"] = out["top5"].index("needle") + 1 if "needle" in out["top5"] else None
        out["memory_after_retrieve_mb"] = memory_mb()
        t = time.perf_counter()
        answer = model.answer(QUESTION, bank, max_new_tokens=8)
        out["answer_s"] = round(time.perf_counter() - t, 2)
        out["answer"] = answer.text
        out["memory_after_answer_mb"] = memory_mb()
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the control is expected to land here; reported, not raised
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    out["peak_rss_mb"] = round(status_kb("VmHWM") / 1024, 1)  # private + mapped file pages
    out["memory_before_load_mb"] = before
    return out


def child(args: argparse.Namespace) -> int:
    import torch

    from msa_core import MSAModel

    torch.set_num_threads(args.threads)
    model = MSAModel.from_pretrained("default")
    path = Path(args.bank)
    if args.phase == "build":
        result = build(model, path, args.tokens)
    else:
        result = query(model, path, args.phase, args.kr_bytes, args.headroom)
    print(json.dumps(result))
    return 0


def run_phase(args: argparse.Namespace, phase: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--bank", args.bank, "--tokens", str(args.tokens),
           "--headroom", str(args.headroom), "--threads", str(args.threads)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode and phase == "same":  # an allocation failure may also kill the process outright
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"kv": phase, "ok": False, "error": f"process exited with {proc.returncode}: {tail[0][:300]}"}
    if proc.returncode:
        raise SystemExit(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=5_000_000)
    ap.add_argument("--headroom", type=int, default=256, help="MB of data beyond K̄_R the query may use")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bank", default=None, help="bank folder (default: a temporary one, removed after)")
    ap.add_argument("--phase", choices=("build", "disk", "same"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kr-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "larger_than_memory.json"))
    args = ap.parse_args()
    if args.phase:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="msa-ltm-") as tmp:
        args.bank = args.bank or str(Path(tmp) / "bank")
        built = run_phase(args, "build")
        disk = run_phase(args, "disk", kr_bytes=built["kr_bytes"])
        same = run_phase(args, "same", kr_bytes=built["kr_bytes"])
    from msa_core import __version__

    result = {"benchmark": "larger_than_memory", "msa": __version__, "device": "cpu",
              "python": platform.python_version(), "threads": args.threads, "headroom_mb": args.headroom,
              "build": built, "query_disk_tier": disk, "control_all_in_memory": same,
              "kv_exceeds_limit_room": built["kv_bytes"] > disk["data_limit_bytes"] - disk["data_before_load_bytes"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if disk["ok"] and not same["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
