"""Soak test (issue 24, item 5): thousands of mixed bank operations in one process, checked after each.

    python benchmarks/soak.py                          # the full form: 10,000 cycles, default model
    python benchmarks/soak.py --cycles 1000            # a shorter real run (the JSON says how many)
    python benchmarks/soak.py --model tests-tiny-dir --cycles 150 --out /tmp/soak.json   # CI's short form

The bank starts with --docs documents (one batch). Each cycle is one of add (a new document holding a
unique sentence), upsert (new text for an existing id), delete, query, save and load, drawn at random
so the bank hovers around --docs documents. After
every step the invariants are checked: ids unique and equal to a shadow dict kept beside the bank;
parts contiguous; parts, chunks, docstore and all three tensors agree; every text is the shadow's. A
load must give back exactly what was saved, and a save must leave one version folder and no leftovers.
After each add, the document's unique sentence is asked as the question and the run counts whether the
document comes back in the top --k, next to BM25 (msa_integrations.compare) on the same documents and
question and to chance (k / documents). Reported, not asserted (benchmarks/results/soak.json). Resident memory and open file descriptors are sampled as it runs: after the
warm-up (the first fifth), neither may keep growing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from msa_core import MemoryBank, MSAModel, __version__
from msa_core.memory.persist import CURRENT
from msa_core.memory.records import check_parts


def words(text: str) -> list[str]:
    return text.split()


ADJ = words("ancient amber bitter brave crimson dusty electric frozen gentle golden hollow humble icy jagged lonely loud "
       "misty noble pale quiet rusty silent silver smoky stormy swift tangled velvet wild woolen")
ANIMALS = words("otter falcon badger heron walrus lynx beetle salmon moth tortoise raven hare oyster camel gecko bison "
           "squid wren viper panda llama mole finch eel crab goat seal owl bat")
PLACES = words("Lisbon Nairobi Oslo Lima Hanoi Quito Perth Riga Cairo Dublin Seoul Tunis Accra Bergen Cusco Dakar Fiji "
          "Goa Havana Izmir Jaipur Kyoto Lagos Malta Nice Omsk Porto Rome Sofia Turin")
FIELDS = words("astronomy pottery chess algebra beekeeping sailing weaving botany geology opera fencing origami "
          "calligraphy glassblowing falconry cartography archery poetry surgery banking carpentry rowing cooking "
          "tailoring mining dancing farming printing painting welding")
OPS = {"add": 0.25, "upsert": 0.12, "delete": 0.13, "query": 0.3, "save": 0.13, "load": 0.07}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sentence(rng: random.Random, serial: int) -> str:
    """A sentence no other document of the run holds (its serial number), about a random subject."""
    return (f"The {rng.choice(ADJ)} {rng.choice(ANIMALS)} from {rng.choice(PLACES)} studied {rng.choice(FIELDS)} "
            f"and kept {serial} {rng.choice(ADJ)} {rng.choice(ANIMALS)}s in a {rng.choice(ADJ)} box.")


def bm25_or_none():
    """The BM25 baseline of msa_integrations.compare (bm25s), or None where it is not installed."""
    try:
        import bm25s  # noqa: F401

        from msa_integrations.compare.dataset import Document
        from msa_integrations.compare.retrievers import BM25
    except ImportError:
        return None
    return BM25, Document


class Soak:
    def __init__(self, model: MSAModel, root: Path, *, seed: int, docs: int, k: int) -> None:
        self.model, self.root, self.docs, self.k = model, root, docs, k
        self.rng = random.Random(seed)
        self.bank = model.new_bank()
        self.shadow: dict[str, str] = {}
        self.serial = 0
        self.saved: tuple | None = None  # what the last save wrote
        self.saved_shadow: dict[str, str] = {}
        self.hits = self.asked = self.bm25_hits = 0
        self.bm25 = bm25_or_none()

    def prefill(self) -> None:
        """Add `docs` documents in one batch, so the run starts at the size it keeps."""
        ids = [f"doc-{i}" for i in range(1, self.docs + 1)]
        texts = [sentence(self.rng, 10_000 + i) for i in range(1, self.docs + 1)]
        self.model.add(self.bank, texts, ids, [{"serial": i} for i in range(1, self.docs + 1)])
        self.shadow.update(zip(ids, texts))
        self.serial = self.docs
        self.check()

    def step(self) -> str:
        op = self.rng.choices(list(OPS), weights=list(OPS.values()))[0]
        if op in ("upsert", "delete", "query") and not self.shadow:
            op = "add"
        if op == "add" and len(self.shadow) > self.docs * 1.2:
            op = "delete"
        if op == "delete" and len(self.shadow) < self.docs * 0.8:
            op = "add"
        getattr(self, op)()
        self.check()
        return op

    def add(self) -> None:
        self.serial += 1
        doc_id, text = f"doc-{self.serial}", sentence(self.rng, 10_000 + self.serial)
        self.model.add(self.bank, [text], [doc_id], [{"serial": self.serial}])
        self.shadow[doc_id] = text
        found = self.model.retrieve(text, self.bank, self.k)
        self.asked += 1
        self.hits += doc_id in [d.id for d in found]
        if self.bm25 is not None:  # the baseline a user would pick, same question, same documents
            bm25_cls, document = self.bm25
            bm25 = bm25_cls()
            bm25.index([document(id=i, text=t) for i, t in self.shadow.items()])
            self.bm25_hits += doc_id in [i for i, _ in bm25.search([text], self.k)[0]]

    def upsert(self) -> None:
        doc_id = self.rng.choice(list(self.shadow))
        self.serial += 1
        text = sentence(self.rng, 10_000 + self.serial) + " (revised)"
        self.model.add(self.bank, [text], [doc_id], [{"serial": self.serial}])
        self.shadow.pop(doc_id)
        self.shadow[doc_id] = text

    def delete(self) -> None:
        doomed = self.rng.sample(list(self.shadow), min(len(self.shadow), self.rng.randint(1, 3)))
        assert self.bank.delete(doomed + ["never-there"]) == len(doomed)
        for d in doomed:
            del self.shadow[d]

    def query(self) -> None:
        question = sentence(self.rng, self.rng.randint(0, 10_000 + self.serial))
        found = self.model.retrieve(question, self.bank, self.k, filter={"serial": {"$gte": 0}})
        assert len(found) == min(self.k, len(self.shadow)) and all(d.id in self.shadow for d in found)

    def save(self) -> None:
        folder = self.bank.save(self.root)
        names = sorted(p.name for p in self.root.iterdir())
        assert names == sorted([".msa-lock", CURRENT, folder.name]), f"leftovers after save: {names}"
        self.saved, self.saved_shadow = snapshot(self.bank), dict(self.shadow)

    def load(self) -> None:
        if self.saved is None:
            return self.save()
        self.bank = self.model.load_bank(self.root)
        assert _same(snapshot(self.bank), self.saved), "load did not give back what was saved"
        self.shadow = dict(self.saved_shadow)  # changes made since the save are gone, as they should be

    def check(self) -> None:
        bank, ids = self.bank, self.bank.ids()
        assert len(ids) == len(set(ids)) and ids == list(self.shadow), "ids differ from the shadow"
        parts = bank.docstore
        check_parts(parts)
        chunks = sum(p.n_chunks for p in parts)
        assert all(getattr(bank, n).shape[1] == chunks for n in ("k_bar", "v_bar", "kr_bar"))
        assert bank.chunk_counts.tolist() == [p.n_chunks for p in parts]
        assert bank.info()["documents"] == len(self.shadow) and bank.num_parts == len(parts)
        assert all(d["text"] == self.shadow[d["id"]] for d in bank.get(ids)), "a text differs from the shadow"


def snapshot(bank: MemoryBank) -> tuple:
    return bank.ids(), bank.docstore, *(getattr(bank, n).clone() for n in ("k_bar", "v_bar", "kr_bar"))


def _same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], b[2:]))


def growth(samples: list[dict[str, float]], key: str) -> dict[str, float]:
    """Growth of `key` over the run after warm-up: the last fifth's median minus the second fifth's."""
    n = len(samples)
    early = [s[key] for s in samples[n // 5: 2 * n // 5] or samples]
    late = [s[key] for s in samples[4 * n // 5:] or samples]
    return {"after_warmup": statistics.median(early), "at_end": statistics.median(late),
            "growth": statistics.median(late) - statistics.median(early), "max": max(s[key] for s in samples)}


def run(model: MSAModel, cycles: int, *, seed: int = 24, docs: int = 150, k: int = 5,
        sample_every: int = 25) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="msa-soak-") as tmp:
        soak = Soak(model, Path(tmp) / "bank", seed=seed, docs=docs, k=k)
        soak.prefill()  # start at the steady size: memory growth after this is not the bank growing
        counts: Counter = Counter()
        seconds: dict[str, list[float]] = defaultdict(list)
        samples = []
        started = time.perf_counter()
        for cycle in range(1, cycles + 1):
            t = time.perf_counter()
            op = soak.step()  # raises AssertionError on a broken invariant: the run stops there
            seconds[op].append(time.perf_counter() - t)
            counts[op] += 1
            if cycle % sample_every == 0 or cycle == cycles:
                samples.append({"cycle": cycle, "rss_mb": round(rss_mb(), 1), "fds": open_fds(),
                                "documents": len(soak.shadow)})
        wall = time.perf_counter() - started
    rss, fds = growth(samples, "rss_mb"), growth(samples, "fds")
    return {
        "cycles": cycles, "invariants_checked_after_every_step": True, "invariant_failures": 0,
        "ops": dict(counts), "median_ms": {op: round(1000 * statistics.median(v), 2) for op, v in seconds.items()},
        "wall_s": round(wall, 1), "fresh_sentence_top_k_hits": soak.hits, "fresh_sentence_queries": soak.asked,
        "fresh_sentence_hit_rate": round(soak.hits / max(soak.asked, 1), 4),
        "bm25_fresh_sentence_hit_rate": round(soak.bm25_hits / max(soak.asked, 1), 4) if soak.bm25 else None,
        "chance_hit_rate": round(k / docs, 4), "k": k, "target_documents": docs,
        "rss_mb": rss, "open_fds": fds,
        "rss_stable": rss["growth"] <= max(50.0, 0.1 * rss["after_warmup"]), "fds_stable": fds["growth"] <= 0,
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default' or a model folder (tests' tiny ones for CI)")
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--docs", type=int, default=150, help="documents the bank hovers around")
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine "
                    "oversubscribed by several threads per process ran 100x slower)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = MSAModel.from_pretrained(args.model)
    result = run(model, args.cycles, seed=args.seed, docs=args.docs)
    result = {"benchmark": "soak", "form": "full" if args.cycles >= 10_000 else f"short ({args.cycles} cycles)",
              "model": args.model if args.model == "default" else Path(args.model).name, "msa": __version__,
              "device": "cpu", "threads": torch.get_num_threads(), "python": platform.python_version(),
              "machine": platform.machine(), **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if result["rss_stable"] and result["fds_stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
