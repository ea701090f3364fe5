"""The bank's lexical side: BM25 over the text of every part row, for fusion retrieval.

`LexicalIndex` holds one stemmed token list per part row (bm25s' tokenizer: lower-cased words of two
or more characters, English stop words removed, Snowball English stemming by PyStemmer) and scores a
question against every row with bm25s (Lucene BM25, k1=1.5, b=0.75), the settings of the `bm25`
retriever of `msa compare`, which uses this class too.

The index is derived data of the bank's rows: `LexicalCache` keeps the one built for the bank's
current rows and builds a new one when the rows change (add, upsert, delete), tokenising only texts it
has not seen; the BM25 matrix itself is rebuilt from the tokens, which is fast (bm25s has no
incremental update, and IDF changes with every document anyway). It is saved beside the docstore as
`lexical.json` (tokens as vocabulary ids, with the part ids it belongs to) in the same version folder,
covered by the manifest's checksums, so a crash leaves both sides of the bank before or after
together. A bank saved before this file existed loads without it and builds it on first use.

bm25s and PyStemmer are core dependencies: every save writes the index, and an index must not depend
on which optional packages happen to be installed (a stemmer-less index would rank differently).
They are imported on first use, so `import msa_core` stays fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptBankError, InvalidInputError
from .persist import verify_file
from .records import PartRecord

LEXICAL = "lexical.json"
LEXICAL_FORMAT = "msa-lexical-index"
# Tokenizer and BM25 settings; a saved index with other settings is rebuilt from the text on load.
SETTINGS: dict[str, Any] = {"method": "lucene", "k1": 1.5, "b": 0.75, "stemmer": "english", "stopwords": "en"}


def import_bm25s() -> Any:
    """bm25s, imported so that it cannot take the GPU: bm25s imports JAX when JAX is installed, and JAX's first
    use preallocates 75% of the GPU's memory (seen on an H200: router training ran out of memory). Unless the
    user set it, JAX then allocates on demand."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import bm25s

    return bm25s


def tokenize(texts: Sequence[str], settings: dict[str, Any] = SETTINGS) -> list[list[str]]:
    """Stemmed word tokens of each text (stop words removed), as the index and its queries see them."""
    if not texts:
        return []
    bm25s = import_bm25s()
    stemmer = _stemmer(settings["stemmer"])
    return bm25s.tokenize(list(texts), stopwords=settings["stopwords"], stemmer=stemmer, return_ids=False,
                          show_progress=False)


def _stemmer(name: str | None) -> Any:
    if name is None:
        return None
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(name)


class LexicalIndex:
    """BM25 over a fixed list of token rows (one per bank part row, in row order)."""

    def __init__(self, part_ids: Sequence[str], tokens: Sequence[Sequence[str]],
                 settings: dict[str, Any] = SETTINGS) -> None:
        if len(part_ids) != len(tokens):
            raise InvalidInputError(f"{len(part_ids)} part ids but {len(tokens)} token rows")
        self.part_ids = tuple(part_ids)
        self.tokens = tuple(tuple(t) for t in tokens)
        self.settings = dict(settings)
        self._bm25: Any = None  # built on the first score()

    @classmethod
    def from_texts(cls, part_ids: Sequence[str], texts: Sequence[str],
                   settings: dict[str, Any] = SETTINGS) -> LexicalIndex:
        return cls(part_ids, tokenize(texts, settings), settings)

    def __len__(self) -> int:
        return len(self.part_ids)

    def _index(self) -> Any:
        if self._bm25 is None:
            bm25s = import_bm25s()
            s = self.settings
            bm25 = bm25s.BM25(k1=s["k1"], b=s["b"], method=s["method"])
            if any(self.tokens):  # bm25s cannot index a corpus without a single token
                bm25.index([list(t) for t in self.tokens], show_progress=False)
            self._bm25 = bm25
        return self._bm25

    def scores(self, questions: Sequence[str]) -> torch.Tensor:
        """FloatTensor [len(questions), rows]: the BM25 score of every row for each question (0: no term shared)."""
        out = torch.zeros(len(questions), len(self), dtype=torch.float32)
        if not len(self) or not any(self.tokens):
            return out
        bm25 = self._index()
        for i, q in enumerate(tokenize(questions, self.settings)):
            ids = bm25.get_tokens_ids(q)
            if ids:
                out[i] = torch.from_numpy(np.asarray(bm25.get_scores_from_ids(ids), dtype=np.float32))
        return out

    def nbytes(self) -> int:
        """Bytes of the BM25 score matrix (0 until first scored)."""
        bm25 = self._bm25
        return 0 if bm25 is None or not getattr(bm25, "scores", None) else int(
            sum(getattr(v, "nbytes", 0) for v in bm25.scores.values()))

    # ---- files ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The index as JSON: settings, part ids, vocabulary and each row's tokens as vocabulary ids."""
        vocab: dict[str, int] = {}
        rows = [[vocab.setdefault(t, len(vocab)) for t in row] for row in self.tokens]
        data = {"format": LEXICAL_FORMAT, "version": 1, "settings": self.settings, "part_ids": list(self.part_ids),
                "vocab": list(vocab), "rows": rows}
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> LexicalIndex:
        try:
            obj = json.loads(data.decode("utf-8"))
            if not isinstance(obj, dict) or obj.get("format") != LEXICAL_FORMAT or obj.get("version") != 1:
                raise ValueError(f"not a version-1 {LEXICAL_FORMAT} file")
            vocab, rows = obj["vocab"], obj["rows"]
            return cls(obj["part_ids"], [[vocab[i] for i in row] for row in rows], obj["settings"])
        except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, InvalidInputError) as exc:
            raise CorruptBankError(f"corrupt msa bank: {path} is not a readable lexical index ({exc})") from exc


class LexicalCache:
    """The lexical index of a bank's current rows, rebuilt when the rows change (see the module docstring)."""

    def __init__(self, saved: LexicalIndex | None = None) -> None:
        self._parts: tuple[PartRecord, ...] | None = None
        self._index: LexicalIndex | None = None
        self._saved = saved  # read from disk, not yet matched with the rows

    def index_for(self, parts: tuple[PartRecord, ...]) -> LexicalIndex:
        """The index of exactly these rows (the bank passes its state's parts tuple, new on every change)."""
        index = self._index
        if index is not None and self._parts is parts:
            return index
        saved, self._saved = self._saved, None
        if saved is not None and saved.part_ids == tuple(p.id for p in parts) and saved.settings == SETTINGS:
            index = saved
        else:
            # Reuse the tokens of texts the previous rows had; tokenise only the others.
            known = dict(zip((p.text for p in self._parts or ()), index.tokens)) if index is not None else {}
            new = list(dict.fromkeys(p.text for p in parts if p.text not in known))
            known.update(zip(new, (tuple(t) for t in tokenize(new))))
            index = LexicalIndex([p.id for p in parts], [known[p.text] for p in parts])
        self._parts, self._index = parts, index
        return index

    def files(self, parts: tuple[PartRecord, ...]) -> dict[str, bytes]:
        """The files a saved version of these rows holds for the lexical side."""
        return {LEXICAL: self.index_for(parts).to_bytes()}

    @classmethod
    def read(cls, vdir: Path, manifest: dict[str, Any], parts: Sequence[PartRecord]) -> LexicalCache:
        """The cache of a loaded bank: its saved index when the version folder has one (checksum verified,
        part ids checked against the docstore), else empty (built on first use: banks saved before it)."""
        files = manifest.get("files")
        if not isinstance(files, dict) or LEXICAL not in files:
            return cls()
        path = vdir / LEXICAL
        verify_file(path, manifest)
        saved = LexicalIndex.from_bytes(path.read_bytes(), path)
        ids = tuple(p.id for p in parts)
        if saved.part_ids != ids:
            raise CorruptBankError(f"corrupt msa bank: {path} indexes other parts than the docstore "
                                   f"({len(saved.part_ids)} rows against {len(ids)})")
        return cls(saved)
