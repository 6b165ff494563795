"""Images for classification: IDX files, image folders or ``datasets``; augmentations in plain torch.

Augmentations are deterministic per sample: sample ``i`` in epoch ``e`` draws from a generator seeded with
``(seed, e, i)``, so the data a step sees does not depend on ranks, micro-batches or workers.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F

from .data_text import resolve_path

_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, then uint8 data."""
    path = resolve_path(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes (truncated?)")
    return data.reshape(dims)


def write_idx(path: str, array: np.ndarray):
    """Write a uint8 array as IDX (gzipped when the name ends in .gz); used by tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


class _Source:
    """Uniform access: ``image(i)`` -> uint8 tensor CxHxW, ``label(i)`` -> int."""

    def __init__(self, images=None, labels=None, files=None, hf=None, d=None):
        self.images, self.labels, self.files, self.hf, self.d = images, labels, files, hf, d

    def __len__(self):
        return len(self.labels) if self.labels is not None else len(self.hf)

    def get(self, i):
        if self.images is not None:
            img = torch.from_numpy(np.array(self.images[i]))
            img = img.unsqueeze(0) if img.dim() == 2 else img.permute(2, 0, 1)
            return img, int(self.labels[i])
        if self.files is not None:
            return _load_pil(self.files[i], self.d["channels"]), int(self.labels[i])
        row = self.hf[int(i)]
        return _pil_to_tensor(row[self.d["image_field"]], self.d["channels"]), int(row[self.d["label_field"]])


def _pil_to_tensor(img, channels):
    img = img.convert("L" if channels == 1 else "RGB")
    t = torch.from_numpy(np.array(img))
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def _load_pil(path, channels):
    from PIL import Image

    with Image.open(path) as im:
        return _pil_to_tensor(im, channels)


def _folder(root):
    root = resolve_path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, name))):
            for n in sorted(names):
                if n.lower().endswith(_IMG_EXT):
                    files.append(os.path.join(dirpath, n))
                    labels.append(c)
    if not files:
        raise ValueError(f"{root}: no images found in class sub-folders")
    return files, np.asarray(labels)


def load_sources(d: dict):
    if d["format"] == "idx":
        train = _Source(read_idx(d["train_images"]), read_idx(d["train_labels"]))
        ev = (_Source(read_idx(d["eval_images"]), read_idx(d["eval_labels"]))
              if d["eval_images"] and d["eval_labels"] else None)
    elif d["format"] == "imagefolder":
        f, lab = _folder(d["train_dir"])
        train = _Source(files=f, labels=lab, d=d)
        ev = None
        if d["eval_dir"]:
            f, lab = _folder(d["eval_dir"])
            ev = _Source(files=f, labels=lab, d=d)
    else:
        import datasets

        train = _Source(hf=datasets.load_dataset(d["hf_dataset"], d["hf_config"], split=d["hf_split"]), d=d)
        ev = _Source(hf=datasets.load_dataset(d["hf_dataset"], d["hf_config"], split=d["hf_eval_split"]), d=d)
    for name, s in (("train", train), ("eval", ev)):
        if s is not None and s.images is not None and len(s.images) != len(s.labels):
            raise ValueError(f"data: {name} images and labels differ in count ({len(s.images)} vs {len(s.labels)})")
    return train, ev


class ImageDataset(torch.utils.data.Dataset):
    """Indexed with ``(index, epoch)``; ``epoch = -1`` (or a plain index) is evaluation: no augmentation."""

    def __init__(self, source: _Source, d: dict, seed: int, train: bool, limit: int | None = None):
        self.src, self.d, self.seed, self.train = source, d, seed, train
        self.n = min(len(source), limit) if limit else len(source)
        c = d["channels"]
        self.mean = torch.tensor(d["mean"] or [0.5] * c).view(c, 1, 1)
        self.std = torch.tensor(d["std"] or [0.25] * c).view(c, 1, 1)
        self.aug = d["augment"]

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, -1)
        img, label = self.src.get(i)
        x = img.float().div_(255)
        if x.shape[0] != self.d["channels"]:
            x = x.expand(self.d["channels"], -1, -1) if x.shape[0] == 1 else x.mean(0, keepdim=True)
        size = self.d["image_size"]
        if self.train and epoch >= 0:
            g = np.random.default_rng([self.seed, epoch + 1, i])
            x = self._augment(x, g, size)
        elif size is not None and tuple(x.shape[1:]) != (size, size):
            # evaluation: resize the short side to size/0.875, centre crop
            x = _resize_short(x, int(round(size / 0.875)) if self.aug["random_resized_crop"] else size)
            x = _center_crop(x, size)
        x = (x - self.mean) / self.std
        return {"pixel_values": x, "labels": torch.tensor(label)}

    def _augment(self, x, g, size):
        a = self.aug
        if a["random_resized_crop"]:
            x = _random_resized_crop(x, g, size or x.shape[-1])
        elif size is not None and tuple(x.shape[1:]) != (size, size):
            x = _center_crop(_resize_short(x, size), size)
        p = a["random_crop_padding"]
        if p:
            h, w = x.shape[1:]
            xp = F.pad(x, (p, p, p, p))
            top, left = int(g.integers(0, 2 * p + 1)), int(g.integers(0, 2 * p + 1))
            x = xp[:, top:top + h, left:left + w]
        if a["hflip"] and g.random() < 0.5:
            x = x.flip(-1)
        return x.contiguous()


def _resize_short(x, s):
    h, w = x.shape[1:]
    if min(h, w) == s:
        return x
    nh, nw = (s, max(1, round(w * s / h))) if h <= w else (max(1, round(h * s / w)), s)
    return F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]


def _center_crop(x, s):
    h, w = x.shape[1:]
    top, left = max(0, (h - s) // 2), max(0, (w - s) // 2)
    return x[:, top:top + s, left:left + s]


def _random_resized_crop(x, g, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop (as torchvision's RandomResizedCrop): area and aspect ratio drawn, 10 tries."""
    h, w = x.shape[1:]
    area = h * w
    for _ in range(10):
        a = area * g.uniform(*scale)
        r = float(np.exp(g.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round((a * r) ** 0.5)), int(round((a / r) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1))
            break
    else:
        ch, cw = min(h, w), min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, top:top + ch, left:left + cw]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
