"""Shared fixtures: small data the tests make themselves (no downloads, no big installs)."""

import numpy as np

_WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
          "has had also first one new after two its city school war film music river team world game "
          "king church state people year group time album song party made called born played became "
          "known used part during member released south north century name high many most other").split()


def write_text_corpus(path, n_docs=300, seed=0):
    """Paragraphs of random words (blank-line separated documents)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(20, 60))
        docs.append(" ".join(rng.choice(_WORDS, size=n)) + ".")
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_idx_images(folder, n_train=256, n_eval=64, size=12, classes=4, seed=0):
    """IDX files (gzipped) of a learnable synthetic task: class = which quadrant is bright."""
    from trainers.data_image import write_idx

    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_eval)):
        y = rng.integers(0, classes, size=n).astype(np.uint8)
        x = rng.integers(0, 80, size=(n, size, size)).astype(np.uint8)
        h = size // 2
        for i, c in enumerate(y):
            r, q = divmod(int(c) % 4, 2)
            x[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
        write_idx(str(folder / f"{split}-images-idx3-ubyte.gz"), x)
        write_idx(str(folder / f"{split}-labels-idx1-ubyte.gz"), y)
        out[split] = (folder / f"{split}-images-idx3-ubyte.gz", folder / f"{split}-labels-idx1-ubyte.gz")
    return out



# --------------------------------------------------------------------------------------------- markers
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (full-size checks, long runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
