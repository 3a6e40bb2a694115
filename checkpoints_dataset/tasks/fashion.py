"""Fashion-MNIST tasks: fashion_mlp, fashion_cnn, fashion_cnn_bn.

Data: the four standard gzip IDX files, read with numpy from ``data_dir`` (default: ``$FASHION_MNIST_DIR``,
else where Debian's ``dataset-fashion-mnist`` package puts them). Pixels are scaled to [0, 1]; the MLP sees 784 features,
the CNNs 1x28x28 images.

Splits: the last 5,000 images of the training file (after a fixed shuffle by ``split_seed``) are "val",
the rest "train"; "test" is the test file. For speed, ``eval_size`` (default 2,000) caps the val and test
splits to a fixed subset (the first ``eval_size`` of each after the shuffle); ``eval_size=None`` keeps
them whole. The ``train_loss`` metric is measured on a fixed ``eval_size`` subset of the train split
(``split("train_eval")``), since scoring 55,000 images at every checkpoint of every run is too slow.

The CNN follows G.pt's CIFAR-10 ConvNet adapted to 1x28x28: conv3x3 1->16 stride 2 (no bias), ReLU,
conv3x3 16->32 (no bias), ReLU, global average pool, linear 32->10; ``fashion_cnn_bn`` adds BatchNorm2d
after each conv.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..fileio import atomic_write, remove_stale_temps
from .base import ClassificationTask

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist/"   # where Debian's dataset-fashion-mnist puts the files
DATA_DIR_ENV = "FASHION_MNIST_DIR"                          # overrides DEFAULT_DATA_DIR when set


def default_data_dir() -> Path:
    """``$FASHION_MNIST_DIR`` when set, else Debian's location."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


DEFAULT_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# sha256 of the *decompressed* IDX bytes: the same for upstream's files and Debian's re-compressed ones.
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzip or plain) IDX file into a numpy array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(data)} bytes, header says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def missing_files_message(data_dir: str | Path) -> str:
    return (f"Fashion-MNIST files not found in {data_dir} (need {', '.join(FILES.values())}). Get them with "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts them in {DEFAULT_DATA_DIR}), or "
            f"with a network: `python -c \"from checkpoints_dataset.tasks.fashion import download_fashion_mnist; "
            f"download_fashion_mnist('DIR')\"` and pass --data-dir DIR (or set {DATA_DIR_ENV}=DIR).")


def _gunzipped_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_fashion_mnist(dest: str | Path, base_url: str = DEFAULT_BASE_URL,
                           checksums: dict[str, str] | None = None) -> Path:
    """Download the four gzip IDX files into ``dest`` and verify them; returns ``dest``.

    Each file's decompressed bytes must match ``checksums`` (file name -> sha256, default ``SHA256``);
    a mismatch raises ValueError and leaves no file behind. Files already present and valid are kept.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)   # what killed downloads left
    checksums = SHA256 if checksums is None else checksums
    for fname in FILES.values():
        target = dest / fname
        if target.exists() and _gunzipped_sha256(target) == checksums[fname]:
            continue

        def download(out, fname=fname) -> None:   # into the temporary file; renamed only when it checks out
            with urllib.request.urlopen(base_url.rstrip("/") + "/" + fname) as resp:
                shutil.copyfileobj(resp, out)
            out.flush()
            got = _gunzipped_sha256(Path(out.name))
            if got != checksums[fname]:
                raise ValueError(f"checksum mismatch for {fname} from {base_url}: sha256 {got}, "
                                 f"expected {checksums[fname]}; the download is corrupt or not Fashion-MNIST")

        atomic_write(target, download)
    return dest


def load_fashion_mnist(data_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The four arrays (``train_images [60000, 28, 28] uint8``, ``train_labels``, ``test_*``)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not all((data_dir / f).exists() for f in FILES.values()):
        raise FileNotFoundError(missing_files_message(data_dir))
    return {k: read_idx(data_dir / f) for k, f in FILES.items()}


class FashionTask(ClassificationTask):
    """Fashion-MNIST with an MLP (784-32-10), G.pt's ConvNet, or the ConvNet with BatchNorm."""

    eval_networks_chunk = 32
    eval_samples_chunk = 1000

    def __init__(self, arch: Literal["mlp", "cnn", "cnn_bn"] = "mlp", data_dir: str | Path | None = None,
                 eval_size: int | None = 2000, val_size: int = 5000, split_seed: int = 0, hidden: int = 32,
                 compression: bool = False):
        if arch not in ("mlp", "cnn", "cnn_bn"):
            raise ValueError(f"unknown Fashion-MNIST architecture {arch!r}; use mlp, cnn or cnn_bn")
        if not isinstance(hidden, (int, np.integer)) or hidden < 1 or (arch != "mlp" and hidden != 32):
            raise ValueError(f"hidden={hidden!r}: the hidden width is an option of fashion_mlp only, one width >= 1 "
                             f"(one hidden layer); fashion_{arch}'s layers are fixed")
        if eval_size is not None and eval_size < 1 or not 1 <= val_size < 60000:
            raise ValueError(f"eval_size must be None or >= 1 and val_size in [1, 60000), got {eval_size}, {val_size}")
        self.arch, self.name = arch, f"fashion_{arch}"
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.eval_size, self.val_size, self.split_seed, self.hidden = eval_size, val_size, split_seed, int(hidden)
        self.compression = bool(compression)   # the metrics sparsity and bits
        if not all((self.data_dir / f).exists() for f in FILES.values()):  # fail early, before any work
            raise FileNotFoundError(missing_files_message(self.data_dir))

    def build_options(self) -> dict:
        """The options that change the networks or their metrics, when they differ from the defaults (a store
        records them, so ``train``, ``prompt`` and ``evaluate`` rebuild its network: ``hidden=1280`` stays
        784-1280-10). ``data_dir`` is where the files are, not what they hold, so it is not recorded."""
        defaults = {"hidden": 32, "eval_size": 2000, "val_size": 5000, "split_seed": 0, "compression": False}
        return {k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v}

    def build_model(self) -> nn.Module:
        if self.arch == "mlp":
            return nn.Sequential(nn.Flatten(), nn.Linear(784, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))
        bn = self.arch == "cnn_bn"
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, bias=False), *([nn.BatchNorm2d(16)] if bn else []), nn.ReLU(),
            nn.Conv2d(16, 32, 3, bias=False), *([nn.BatchNorm2d(32)] if bn else []), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        raw = load_fashion_mnist(self.data_dir)

        def tensors(images, labels, idx):
            x = torch.from_numpy(images[idx].astype(np.float32) / 255.0)[:, None]   # [N, 1, 28, 28]
            if self.arch == "mlp":
                x = x.reshape(len(idx), 784)                                         # [N, 784]
            return x, torch.from_numpy(labels[idx].astype(np.int64))

        rng = np.random.default_rng(self.split_seed)
        order = rng.permutation(len(raw["train_labels"]))
        test_order = rng.permutation(len(raw["test_labels"]))
        cap = slice(None) if self.eval_size is None else slice(0, self.eval_size)
        train_idx = order[:-self.val_size]
        return {
            "train": tensors(raw["train_images"], raw["train_labels"], train_idx),
            "train_eval": tensors(raw["train_images"], raw["train_labels"], train_idx[cap]),
            "val": tensors(raw["train_images"], raw["train_labels"], order[-self.val_size:][cap]),
            "test": tensors(raw["test_images"], raw["test_labels"], test_order[cap]),
        }

    def eval_split(self, name):
        """``train_loss`` is measured on the fixed subset ``split("train_eval")``; val/test on the whole split."""
        return self.split("train_eval" if name == "train" else name)
