"""Tokenised pretraining corpora: the folder `python -m lwz.data tokenize` writes, and the packed,
weight-mixed, exactly resumable token stream lwz/pretrain.py trains on.

Folder layout (written under `<out>.tmp-<pid>` and renamed into place when complete):
  meta.json          format, the identity of the inputs and the tokenizer, eos id, counts, shard names
  tokens_NNNNN.bin   uint32 little-endian token ids, documents end to end, each ending with EOS
                     (memory-mapped with numpy at training time; a document never spans two shards)
  index.npy          int64 [D, 3]: (shard, first token, length) of every document, in input order

The stream (`CPTStream`): each source's documents are split into held-out and training documents
by a seeded permutation (the first round(heldout_share x D) of it are held out), and the training
documents are walked in a fresh seeded order every epoch. Micro-batches of exactly `seq_len` tokens
are filled piece by piece; each piece comes from the source furthest behind its token share
(consumed / weight smallest), and is the rest of that source's current document, cut where the
micro-batch is full (the remainder starts the source's next piece). Every piece is its own sequence
in the packed batch: no attention across pieces, positions restart at 0. The whole state is a few
integers per source, so a checkpoint resumes the stream exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

FORMAT = "lwz-tokens"
VERSION = 1
META = "meta.json"
INDEX = "index.npy"
TOKEN_DTYPE = np.dtype("<u4")


class CorpusError(ValueError):
    """A token folder that is missing, damaged or does not fit the run; one line naming it."""


def shard_name(k: int) -> str:
    return f"tokens_{k:05d}.bin"


def tokenizer_identity(path: str) -> dict:
    """sha256 of each tokenizer file in folder `path` (what decides the token ids, not where it lives)."""
    out = {}
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        f = os.path.join(path, name)
        if os.path.isfile(f) and (name.startswith("tokenizer") or name in ("vocab.json", "merges.txt",
                                                                              "special_tokens_map.json",
                                                                              "added_tokens.json")):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


# ---- writing -------------------------------------------------------------------------------------

class ShardWriter:
    """Appends documents (token arrays, EOS included) to tokens_NNNNN.bin files of at most
    `shard_tokens` tokens each (a longer document gets a shard of its own) in `folder`."""

    def __init__(self, folder: str, shard_tokens: int):
        self.folder, self.cap = folder, shard_tokens
        self.shards: list[int] = []  # tokens per shard
        self.index: list[tuple[int, int, int]] = []
        self._f = None

    def add(self, ids: np.ndarray) -> None:
        n = int(ids.size)
        if self._f is None or (self.shards[-1] and self.shards[-1] + n > self.cap):
            self._roll()
        k = len(self.shards) - 1
        self.index.append((k, self.shards[k], n))
        self._f.write(ids.astype(TOKEN_DTYPE, copy=False).tobytes())
        self.shards[k] += n

    def _roll(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = open(os.path.join(self.folder, shard_name(len(self.shards))), "wb")
        self.shards.append(0)

    def close(self) -> np.ndarray:
        """Closes the last shard, writes index.npy; returns the index [D, 3]."""
        if self._f is not None:
            self._f.close()
            self._f = None
        index = np.asarray(self.index, dtype=np.int64).reshape(-1, 3)
        np.save(os.path.join(self.folder, INDEX), index)
        return index


# ---- reading -------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """An opened token folder: `tokens[k]` the memory-mapped uint32 shards, `index` [D, 3] int64."""
    path: str
    meta: dict
    tokens: list
    index: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """int64 [D] tokens per document (EOS included)."""
        return self.index[:, 2]

    def piece(self, doc: int, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of document `doc`, as a uint32 view of the shard."""
        k, off, _ = self.index[doc]
        return self.tokens[k][off + start:off + start + n]


def read_meta(path: str) -> dict | None:
    """meta.json of a token folder, or None when there is none; CorpusError when it is unreadable."""
    f = os.path.join(path, META)
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise CorpusError(f"{f}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorpusError(f"{f}: not a token folder of `python -m lwz.data tokenize`")
    if meta.get("version") != VERSION:
        raise CorpusError(f"{f}: format version {meta.get('version')!r}, this lwz reads {VERSION}; tokenize again")
    return meta


def open_corpus(path: str) -> Corpus:
    """Open a token folder, checking its shards against meta.json and the index (one-line errors)."""
    if not os.path.isdir(path):
        raise CorpusError(f"{path}: token folder not found (write one with `python -m lwz.data tokenize`)")
    meta = read_meta(path)
    if meta is None:
        raise CorpusError(f"{path}: no {META}; not a complete token folder of `python -m lwz.data tokenize`")
    tokens = []
    for name, n in zip(meta["shards"], meta["shard_tokens"]):
        f = os.path.join(path, name)
        size = os.path.getsize(f) if os.path.isfile(f) else -1
        if size != n * TOKEN_DTYPE.itemsize:
            raise CorpusError(f"{f}: {'missing' if size < 0 else f'{size} bytes'}, meta.json says "
                              f"{n * TOKEN_DTYPE.itemsize}; tokenize again")
        tokens.append(np.memmap(f, dtype=TOKEN_DTYPE, mode="r") if n else np.zeros(0, TOKEN_DTYPE))
    try:
        index = np.load(os.path.join(path, INDEX))
    except (OSError, ValueError) as e:
        raise CorpusError(f"{os.path.join(path, INDEX)}: unreadable ({e})") from None
    if index.ndim != 2 or index.shape != (meta["num_documents"], 3):
        raise CorpusError(f"{path}: {INDEX} has shape {index.shape}, expected ({meta['num_documents']}, 3)")
    if len(index) and (int(index[:, 0].max()) >= len(tokens) or
                       bool((index[:, 1] + index[:, 2] > np.asarray(meta["shard_tokens"])[index[:, 0]]).any())):
        raise CorpusError(f"{path}: {INDEX} points past the end of a shard; tokenize again")
    return Corpus(path=path, meta=meta, tokens=tokens, index=index)


# ---- the training stream --------------------------------------------------------------------------

def split_documents(n_docs: int, share: float, seed: int, source: int) -> tuple[np.ndarray, np.ndarray]:
    """(training doc ids, held-out doc ids) of a source of n_docs documents: the first
    round(share x n_docs) of a seeded permutation are held out (at least one when share > 0 and
    there are two documents or more; never all)."""
    perm = np.random.default_rng([seed, 0, source]).permutation(n_docs)
    k = int(round(share * n_docs))
    if share > 0 and n_docs >= 2:
        k = min(max(k, 1), n_docs - 1)
    return np.sort(perm[k:]), np.sort(perm[:k])


@dataclass
class Piece:
    """Tokens [start, start + length) of document `doc` of source `source`: one packed sequence."""
    source: int
    doc: int
    start: int
    length: int


class CPTStream:
    """The training stream over several corpora mixed by token share (see the module doc).

    next_microbatches(n) -> n lists of Pieces of exactly seq_len tokens each; state_dict() /
    load_state_dict() hold its position (per source: epoch, position in the epoch's order, offset
    into the current document, tokens consumed)."""

    def __init__(self, corpora: list[Corpus], weights: list[float], seq_len: int, heldout_share: float, seed: int):
        self.corpora, self.seq_len, self.seed = corpora, seq_len, seed
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.train_docs, self.heldout_docs = [], []
        for k, c in enumerate(corpora):
            tr, ho = split_documents(len(c), heldout_share, seed, k)
            tr = tr[c.lengths[tr] > 0]
            if not len(tr):
                raise CorpusError(f"{c.path}: no training documents ({len(c)} documents, "
                                  f"{len(ho)} held out by cpt.heldout_share)")
            self.train_docs.append(tr)
            self.heldout_docs.append(ho)
        self.state = [dict(epoch=0, pos=0, offset=0, consumed=0) for _ in corpora]
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._orders:
            self._orders = {kk: v for kk, v in self._orders.items() if kk[0] != k}  # one epoch per source kept
            self._orders[key] = np.random.default_rng([self.seed, 1, k, epoch]).permutation(self.train_docs[k])
        return self._orders[key]

    def _take(self, k: int, room: int) -> Piece:
        st = self.state[k]
        order = self._order(k, st["epoch"])
        doc = int(order[st["pos"]])
        left = int(self.corpora[k].lengths[doc]) - st["offset"]
        n = min(left, room)
        piece = Piece(k, doc, st["offset"], n)
        st["consumed"] += n
        if n == left:  # document finished: the next one (a new epoch after the last)
            st["offset"] = 0
            st["pos"] += 1
            if st["pos"] == len(order):
                st["epoch"], st["pos"] = st["epoch"] + 1, 0
        else:
            st["offset"] += n
        return piece

    def next_microbatches(self, n: int) -> list[list[Piece]]:
        out = []
        for _ in range(n):
            pieces, room = [], self.seq_len
            while room:
                # the source furthest behind its share of the tokens (ties: the first listed)
                k = int(np.argmin([s["consumed"] / w for s, w in zip(self.state, self.weights)]))
                p = self._take(k, room)
                pieces.append(p)
                room -= p.length
            out.append(pieces)
        return out

    def heldout_microbatches(self, max_tokens: int) -> list[list[Piece]]:
        """The held-out documents of every source (in order), packed into micro-batches of at most
        seq_len tokens, up to max_tokens tokens in all: the same every time."""
        out, cur, room, total = [], [], self.seq_len, 0
        for k, docs in enumerate(self.heldout_docs):
            for doc in docs.tolist():
                off, left = 0, int(self.corpora[k].lengths[doc])
                while left and total < max_tokens:
                    n = min(left, room, max_tokens - total)
                    cur.append(Piece(k, doc, off, n))
                    off, left, room, total = off + n, left - n, room - n, total + n
                    if not room:
                        out.append(cur)
                        cur, room = [], self.seq_len
        if cur:
            out.append(cur)
        return out

    def tokens(self, pieces: list[Piece]) -> list[np.ndarray]:
        return [self.corpora[p.source].piece(p.doc, p.start, p.length) for p in pieces]

    def state_dict(self) -> dict:
        return {"sources": [dict(s) for s in self.state]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["sources"]) != len(self.state):
            raise CorpusError(f"the checkpoint's data position has {len(sd['sources'])} sources, "
                              f"cpt.sources lists {len(self.state)}")
        self.state = [dict(s) for s in sd["sources"]]


def targets_in(pieces: list[Piece]) -> int:
    """Next-token targets of packed pieces: every token but each piece's last."""
    return sum(max(p.length - 1, 0) for p in pieces)
