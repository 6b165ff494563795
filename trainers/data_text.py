"""Text -> WordPiece tokens -> packed sequences (cached shards on disk) -> dynamic masking.

Documents come from local files through ``datasets`` (text, json/jsonl, csv, parquet; a JSON file holding a
mapping or a list of records is read directly) or from a ``datasets`` name. The tokenizer is a
``tokenizers`` WordPiece model: a folder or file given by the recipe, or one trained on the training corpus.
Token ids are packed into fixed-length chunks and written as ``.npy`` shards under a cache folder keyed by
the inputs, then memory-mapped, so large corpora are tokenised once.

Masking is dynamic and deterministic: the masks of sample ``i`` in epoch ``e`` come from a generator
seeded with ``(seed, e, i)``, so they do not depend on the rank, the micro-batch or the number of workers.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROWS_PER_SHARD = 200_000


def resolve_path(p: str) -> str:
    """``pkg://package/rel/path`` -> a file inside an installed package (found without importing it)."""
    if p.startswith("pkg://"):
        pkg, _, rel = p[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{p}: package {pkg!r} is not installed")
        return os.path.join(list(spec.submodule_search_locations)[0], rel)
    return os.path.expanduser(p)


def expand_files(spec) -> list[str]:
    if spec is None:
        return []
    files = []
    for p in [spec] if isinstance(spec, str) else spec:
        p = resolve_path(p)
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        for h in hits:
            if not os.path.exists(h):
                raise FileNotFoundError(f"data file not found: {h}")
        files += hits
    return files


def _fmt(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = path.split(".")[-1].lower()
    return {"txt": "text", "json": "json", "jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}.get(ext, "text")


def read_documents(files: list[str], fmt: str, text_field: str):
    """A ``datasets.Dataset`` with one column ``text``, one row a document."""
    import datasets

    parts = []
    for f in files:
        kind = _fmt(f, fmt)
        if kind == "json":
            with open(f) as fh:
                obj = json.load(fh)
            rows = obj.values() if isinstance(obj, dict) else obj
            texts = [r[text_field] if isinstance(r, dict) else str(r) for r in rows]
            parts.append(datasets.Dataset.from_dict({"text": texts}))
            continue
        builder = {"text": "text", "jsonl": "json", "csv": "csv", "parquet": "parquet"}[kind]
        ds = datasets.load_dataset(builder, data_files=f, split="train")
        if builder == "text":
            # one line a document is wrong for paragraph text: join blank-line separated blocks
            parts.append(_paragraphs(ds))
        else:
            parts.append(ds.select_columns([text_field]).rename_column(text_field, "text")
                         if text_field != "text" else ds.select_columns(["text"]))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _paragraphs(ds):
    import datasets

    docs, cur = [], []
    for line in ds["text"]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            docs.append(" ".join(cur))
            cur = []
    if cur:
        docs.append(" ".join(cur))
    return datasets.Dataset.from_dict({"text": docs})


def load_documents(d: dict):
    import datasets

    datasets.disable_progress_bars()
    if d["train_files"]:
        docs = read_documents(expand_files(d["train_files"]), d["format"], d["text_field"])
    else:
        import datasets

        docs = datasets.load_dataset(d["hf_dataset"], d["hf_config"], split=d["hf_split"])
        if d["text_field"] != "text":
            docs = docs.rename_column(d["text_field"], "text")
        docs = docs.select_columns(["text"])
    docs = docs.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if d["max_documents"]:
        docs = docs.select(range(min(d["max_documents"], len(docs))))
    eval_docs = None
    if d["eval_files"]:
        eval_docs = read_documents(expand_files(d["eval_files"]), d["format"], d["text_field"])
    return docs, eval_docs


def _fingerprint(d: dict, extra: str) -> str:
    h = hashlib.sha256()
    for k in sorted(d):
        if k not in ("num_workers", "cache_dir", "eval_samples"):
            h.update(f"{k}={d[k]!r};".encode())
    for f in expand_files(d["train_files"]) + expand_files(d["eval_files"]):
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def build_tokenizer(d: dict, docs, cache: Path):
    """A ``tokenizers.Tokenizer`` (WordPiece, BERT normalisation)."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    if d["tokenizer"]:
        p = resolve_path(d["tokenizer"])
        if os.path.isdir(p):
            if os.path.exists(os.path.join(p, "tokenizer.json")):
                return Tokenizer.from_file(os.path.join(p, "tokenizer.json"))
            p = os.path.join(p, "vocab.txt")
        if p.endswith(".json"):
            return Tokenizer.from_file(p)
        return BertWordPieceTokenizer(p, lowercase=d["lowercase"])._tokenizer
    path = cache / "tokenizer.json"
    if not path.exists():
        tok = BertWordPieceTokenizer(lowercase=d["lowercase"])
        tok.train_from_iterator((docs[i:i + 1000]["text"] for i in range(0, len(docs), 1000)),
                                vocab_size=d["vocab_size"], min_frequency=2, special_tokens=SPECIALS,
                                show_progress=False)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return Tokenizer.from_file(str(path))


def _pack(docs, tok, chunk: int, sep_id: int, out_prefix: Path, dtype) -> list[str]:
    """Concatenate documents (separated by [SEP]) and cut into rows of ``chunk`` tokens; write shards."""
    shards, rows, buf = [], [], []
    n_rows = 0

    def flush(final=False):
        nonlocal rows
        if rows and (final or len(rows) >= ROWS_PER_SHARD):
            name = f"{out_prefix.name}_{len(shards):05d}.npy"
            tmp = out_prefix.parent / (name + ".tmp.npy")
            np.save(tmp, np.asarray(rows, dtype=dtype))
            os.replace(tmp, out_prefix.parent / name)
            shards.append(name)
            rows = []

    for i in range(0, len(docs), 1000):
        for enc in tok.encode_batch(docs[i:i + 1000]["text"], add_special_tokens=False):
            buf.extend(enc.ids)
            buf.append(sep_id)
            while len(buf) >= chunk:
                rows.append(buf[:chunk])
                buf = buf[chunk:]
                n_rows += 1
            flush()
    flush(final=True)
    return shards


class PackedCorpus:
    """Memory-mapped packed rows from cached shards."""

    def __init__(self, folder: Path, shards: list[str]):
        self.arrays = [np.load(folder / s, mmap_mode="r") for s in shards]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return np.asarray(self.arrays[s][i - self.offsets[s]], dtype=np.int64)


def prepare_corpus(d: dict, cache_root: Path, nsp: bool, is_builder: bool, barrier):
    """Tokenise and pack once (``is_builder`` ranks), then every rank memory-maps the shards.

    Returns (tokenizer, train PackedCorpus, eval PackedCorpus)."""
    chunk = d["seq_len"] - (3 if nsp else 2)
    key = _fingerprint(d, f"nsp={nsp}")
    folder = cache_root / f"text-{key}"
    index = folder / "index.json"
    if is_builder and not index.exists():
        folder.mkdir(parents=True, exist_ok=True)
        docs, eval_docs = load_documents(d)
        tok = build_tokenizer(d, docs, folder)
        if eval_docs is None:
            every = max(2, round(1 / d["eval_fraction"])) if d["eval_fraction"] > 0 else 0
            if every:
                idx = np.arange(len(docs))
                eval_docs = docs.select(idx[idx % every == 0])
                docs = docs.select(idx[idx % every != 0])
        vocab = tok.get_vocab_size()
        dtype = np.uint16 if vocab < 65536 else np.int32
        sep = tok.token_to_id("[SEP]")
        train = _pack(docs, tok, chunk, sep, folder / "train", dtype)
        ev = _pack(eval_docs, tok, chunk, sep, folder / "eval", dtype) if eval_docs is not None else []
        if d["tokenizer"]:
            tok.save(str(folder / "tokenizer.json"))
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps({"train": train, "eval": ev, "vocab_size": vocab, "chunk": chunk}))
        os.replace(tmp, index)
    barrier()
    from tokenizers import Tokenizer

    meta = json.loads(index.read_text())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    train = PackedCorpus(folder, meta["train"])
    if len(train) == 0:
        raise ValueError(f"data: the training corpus gives no sequence of {d['seq_len']} tokens")
    return tok, train, PackedCorpus(folder, meta["eval"])


class MaskedLMDataset(torch.utils.data.Dataset):
    """Packed rows -> ([CLS] ... [SEP]) with dynamic masking; with ``nsp`` a sentence pair and its label.

    Indexed with ``(index, epoch)``; ``epoch = -1`` is the fixed evaluation masking."""

    def __init__(self, corpus: PackedCorpus, tok, d: dict, nsp: bool, seed: int):
        self.corpus, self.nsp, self.seed = corpus, nsp, seed
        self.seq_len, self.max_pred, self.mask_prob = d["seq_len"], d["max_predictions_per_seq"], d["mask_prob"]
        self.cls, self.sep, self.mask = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
        self.vocab = tok.get_vocab_size()
        self.first_normal = len(SPECIALS)

    def __len__(self):
        return len(self.corpus)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, -1)
        rng = np.random.default_rng([self.seed, epoch + 1, i])
        row = self.corpus[i]
        if self.nsp:
            a = int(rng.integers(1, len(row) - 1))
            first = row[:a]
            if rng.random() < 0.5 or len(self.corpus) == 1:
                second, label = row[a:], 0
            else:
                j = int(rng.integers(0, len(self.corpus) - 1))
                j += j >= i
                second, label = self.corpus[j][: len(row) - a], 1
            ids = np.concatenate([[self.cls], first, [self.sep], second, [self.sep]])
            types = np.zeros(len(ids), dtype=np.int64)
            types[a + 2:] = 1
        else:
            ids = np.concatenate([[self.cls], row, [self.sep]])
            types = np.zeros(len(ids), dtype=np.int64)
        ids = ids.astype(np.int64)
        cand = np.flatnonzero((ids != self.cls) & (ids != self.sep))
        n = min(self.max_pred, max(1, int(round(len(ids) * self.mask_prob))), len(cand))
        pos = np.sort(rng.choice(cand, size=n, replace=False))
        labels = np.full(len(ids), -100, dtype=np.int64)
        labels[pos] = ids[pos]
        r = rng.random(n)
        rand_tok = rng.integers(self.first_normal, self.vocab, size=n)
        ids[pos] = np.where(r < 0.8, self.mask, np.where(r < 0.9, rand_tok, ids[pos]))
        out = {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
               "attention_mask": torch.ones(len(ids), dtype=torch.int64), "labels": torch.from_numpy(labels)}
        if self.nsp:
            out["next_sentence_label"] = torch.tensor(label)
        return out
