"""Readers for the data that exists offline (DESIGN.md section 5), and for the user's own
calibration and evaluation data (``load_data``: a ``.npy``/``.npz``, an image folder, or the
bundled ``fmnist``), as the network's float32 input."""
from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import QuantOpsError

FASHION_MNIST_DIR = Path(os.environ.get("QO_FASHION_MNIST",
                                        "/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise QuantOpsError(f"{path}: not an IDX file of the expected kind (magic {got:#x})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise QuantOpsError(f"{path}: truncated ({data.size} values for shape {dims})")
    return data.reshape(dims)


def fashion_mnist(split: str = "train", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 1, 28, 28) in [0, 1] and labels as int64 (N,).

    The Debian package ``dataset-fashion-mnist`` installs the files (scripts/setup.sh does).
    """
    if split not in _FILES:
        raise QuantOpsError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = Path(root or FASHION_MNIST_DIR)
    img_f, lbl_f = (root / f for f in _FILES[split])
    for f in (img_f, lbl_f):
        if not f.is_file():
            raise QuantOpsError(f"{f} not found: apt-get install dataset-fashion-mnist "
                                "(or set QO_FASHION_MNIST to the folder holding the files)")
    images = _read_idx(img_f, 0x803).astype(np.float32)[:, None] / np.float32(255)
    labels = _read_idx(lbl_f, 0x801).astype(np.int64)
    if len(images) != len(labels):
        raise QuantOpsError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


# -- the user's data: arrays, image folders and the bundled sets ---------------------------
#: ``.npz`` key pairs (images, labels) that ``load_data`` reads, in order of preference
NPZ_KEYS = (("x", "y"), ("data", "label"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif",
                  ".tiff", ".webp")
#: names of the sets that need no path: ``fmnist`` (the split follows the role: ``train`` for
#: calibration, ``test`` for evaluation), or ``fmnist:train`` / ``fmnist:test``
BUNDLED_SETS = ("fmnist", "fmnist:train", "fmnist:test")
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class Data:
    """Inputs ready for the network and their labels, if the source has them."""

    x: np.ndarray                    #: float32, (N, C, H, W) for images
    y: np.ndarray | None             #: int64 (N,), or None
    source: str                      #: what was read (a path or a set name), for reports
    classes: list[str] | None = None  #: an image folder's class subfolders (label order)
    notes: list[str] = field(default_factory=list)  #: what was done to the data

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int, labels: bool = False) -> list:
        """Consecutive batches of ``x`` (with ``labels``: ``(x, y)`` pairs)."""
        if labels and self.y is None:
            raise QuantOpsError(f"{self.source}: no labels")
        return [(self.x[i:i + batch_size], self.y[i:i + batch_size]) if labels
                else self.x[i:i + batch_size] for i in range(0, len(self.x), batch_size)]


def _norm_arrays(normalize, channels: int, source: str):
    """(mean, std) as float32 arrays broadcasting over (N, C, H, W), checked."""
    mean, std = normalize
    m = np.asarray(mean, np.float32).reshape(-1)
    s = np.asarray(std, np.float32).reshape(-1)
    for what, v in (("mean", m), ("std", s)):
        if len(v) not in (1, channels):
            raise QuantOpsError(f"{source}: {len(v)} {what} values for {channels} channels "
                                "(give one, or one per channel)")
        if not np.isfinite(v).all():
            raise QuantOpsError(f"{source}: the normalization {what} is not finite")
    if not (s > 0).all():
        raise QuantOpsError(f"{source}: the normalization std must be > 0")
    return m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1)


def _normalized(x: np.ndarray, normalize, source: str) -> np.ndarray:
    """``(x - mean) / std`` in float32 (a scalar pair keeps numpy's float32 arithmetic, as
    ``ptq.common.FloatModel.normalize`` computes it)."""
    if normalize is None:
        return x.astype(np.float32, copy=False)
    mean, std = normalize
    if np.ndim(mean) == 0 and np.ndim(std) == 0:
        _norm_arrays(normalize, x.shape[1] if x.ndim > 1 else 1, source)
        return ((x - float(mean)) / float(std)).astype(np.float32)
    if x.ndim != 4:
        raise QuantOpsError(f"{source}: per-channel normalization needs (N, C, H, W) images, "
                            f"got shape {x.shape}")
    m, s = _norm_arrays(normalize, x.shape[1], source)
    return ((x - m) / s).astype(np.float32)


def _want(input_shape) -> tuple | None:
    """The per-sample shape wanted: ``input_shape`` without its batch dimension."""
    if input_shape is None:
        return None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise QuantOpsError(f"input shape {shape}: give the batch dimension too, e.g. "
                            "1,3,224,224")
    return shape[1:]


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


def _check_images(x: np.ndarray, source: str, input_shape, notes: list) -> np.ndarray:
    """``x`` as the network's batch of inputs: rank and shape checked against
    ``input_shape``; (N, H, W) gets its channel axis, (N, H, W, C) is moved to (N, C, H,
    W)."""
    if x.dtype.kind not in "biuf":
        raise QuantOpsError(f"{source}: the images are {x.dtype}, not numbers")
    if x.ndim < 2:
        raise QuantOpsError(f"{source}: the images have rank {x.ndim} (shape {x.shape}); "
                            "give (N, C, H, W), (N, H, W) or (N, H, W, C) images")
    if len(x) == 0:
        raise QuantOpsError(f"{source}: no images (the array is empty)")
    want = _want(input_shape)
    gray = x.ndim == 3 and (want is None or (len(want) == 3 and want[0] == 1))
    if gray:   # (N, H, W): one channel
        x = x[:, None]
        notes.append("(N, H, W) images read as one channel")
    if want is None:
        return x
    if x.ndim != len(want) + 1:
        raise QuantOpsError(f"{source}: the images have rank {x.ndim} (shape {x.shape}), the "
                            f"model takes rank {len(want) + 1} (N, {', '.join(map(str, want))})")
    if len(want) == 3 and x.shape[1:] != want and x.shape[1:] == want[1:] + want[:1]:
        x = x.transpose(0, 3, 1, 2)
        notes.append("(N, H, W, C) images moved to (N, C, H, W)")
    if x.shape[1:] != want:
        if len(want) == 3 and x.shape[2:] == want[1:]:
            raise QuantOpsError(f"{source}: the images have {x.shape[1]} channel(s), the "
                                f"model takes {want[0]}")
        raise QuantOpsError(f"{source}: images of shape {_fmt(x.shape[1:])}, the model takes "
                            f"{_fmt(want)}")
    return x


def check_labels(y, n: int, source: str) -> np.ndarray | None:
    """``y`` as int64 class indices (one per image, none negative), or an error naming
    ``source``."""
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise QuantOpsError(f"{source}: the labels must be one class index per image, got "
                            f"shape {y.shape}")
    if len(y) != n:
        raise QuantOpsError(f"{source}: {n} images but {len(y)} labels")
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise QuantOpsError(f"{source}: the labels are {y.dtype}, not class indices")
    if len(y) and y.min() < 0:
        raise QuantOpsError(f"{source}: negative label {int(y.min())}")
    return y.astype(np.int64)


def align_classes(train: Data, test: Data) -> Data:
    """``test`` with its labels numbered as ``train``'s where both are image folders: labels
    follow the sorted class folders, so a validation folder with fewer classes would
    otherwise be scored against the wrong ones; a class the training data lacks is an
    error naming it."""
    if train.classes is None or test.classes is None or train.classes == test.classes:
        return test
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise QuantOpsError(f"{test.source}: class folder(s) {', '.join(unknown[:5])}{more} "
                            f"are not classes of the training data ({train.source})")
    index = np.array([train.classes.index(c) for c in test.classes], np.int64)
    return Data(test.x, index[test.y], test.source, list(train.classes),
                test.notes + ["labels numbered as the training folder's classes"])


def _as_inputs(x: np.ndarray, source: str, normalize, notes: list) -> np.ndarray:
    """Integer pixels are scaled to [0, 1] and normalized; float values are the network's
    input as they are."""
    if x.dtype.kind in "biu":
        notes.append("integer pixels scaled to [0, 1]" +
                     (" and normalized" if normalize is not None else ""))
        return _normalized(x.astype(np.float32) / np.float32(255), normalize, source)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise QuantOpsError(f"{source}: the images hold NaN or infinite values")
    return x


def _read_array_file(path: Path) -> tuple:
    """(images, labels or None) from a ``.npy`` or ``.npz``; never unpickles."""
    npy = path.suffix.lower() == ".npy"
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise QuantOpsError(f"{path}: cannot read it ({e.strerror})") from None
    if head[:6 if npy else 2] != (b"\x93NUMPY" if npy else b"PK"):
        raise QuantOpsError(f"{path}: not a {'.npy' if npy else '.npz'} file (numpy.save"
                            f"{'' if npy else 'z'} writes them)")
    try:
        if npy:
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            for xk, yk in NPZ_KEYS:
                if xk in keys:
                    return z[xk], (z[yk] if yk in keys else None)
    except ValueError as e:
        if "pickle" in str(e):
            raise QuantOpsError(f"{path}: holds pickled Python objects, which are not loaded "
                                "(allow_pickle=False): save plain numeric arrays") from None
        raise QuantOpsError(f"{path}: not a readable numpy file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise QuantOpsError(f"{path}: cannot read it ({e})") from None
    accepted = " or ".join(f"'{a}' (labels '{b}')" for a, b in NPZ_KEYS)
    raise QuantOpsError(f"{path}: no images: it holds {', '.join(map(repr, keys)) or 'no arrays'}; "
                        f"give the images as {accepted}")


def _image_files(root: Path) -> tuple[list, list | None]:
    """([(file, label)], class names or None): class subfolders (ImageFolder), or the
    folder's own images (no labels) when it has none."""
    def images(d: Path, recursive: bool) -> list:
        it = d.rglob("*") if recursive else d.iterdir()
        return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not any(part.startswith(".") for part in p.relative_to(root).parts))
    try:
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        classes = [d for d in subdirs if images(d, True)]
        if classes:
            return [(f, i) for i, d in enumerate(classes) for f in images(d, True)], \
                [d.name for d in classes]
        return [(f, None) for f in images(root, False)], None
    except OSError as e:
        raise QuantOpsError(f"{root}: cannot list it ({e.strerror})") from None


def _read_image(path: Path, channels: int, size: tuple) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(_PIL_MODES[channels])
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise QuantOpsError(f"{path}: cannot read the image ({e})") from None
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)) / np.float32(255)


def load_image_folder(root: str | Path, input_shape, normalize=None, limit: int | None = None,
                      progress: bool = False, seed: int = 0) -> Data:
    """An image folder as (N, C, H, W) float32: class subfolders give the labels (sorted
    names -> 0, 1, ...; torchvision's ImageFolder), a folder of images alone gives none.
    Each image is converted to the channels of ``input_shape`` (1: grayscale, 3: RGB, 4:
    RGBA), resized (bilinear) to its H x W, scaled to [0, 1] and, with ``normalize=(mean,
    std)`` (scalars or one per channel), normalized.  ``limit``: that many files drawn at
    random (``seed``), classes mixed, kept in folder order."""
    root = Path(root)
    want = _want(input_shape)
    if want is None or len(want) != 3:
        raise QuantOpsError(f"{root}: an image folder needs the input shape N,C,H,W (e.g. "
                            "--input-shape 1,3,224,224)")
    if want[0] not in _PIL_MODES:
        raise QuantOpsError(f"{root}: the model takes {want[0]} channels; images have 1 "
                            "(grayscale), 3 (RGB) or 4 (RGBA)")
    files, classes = _image_files(root)
    if not files:
        raise QuantOpsError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in "
                            "class subfolders")
    if limit is not None and limit < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), limit, replace=False))
        files = [files[i] for i in pick]
    x = np.empty((len(files),) + want, np.float32)
    for i, (f, _) in enumerate(tqdm(files, desc=f"reading {root.name}", leave=False,
                                    disable=not progress)):
        x[i] = _read_image(f, want[0], want[1:])
    y = None if classes is None else np.array([lab for _, lab in files], np.int64)
    notes = [f"{len(files)} images" + (f" in {len(classes)} classes" if classes else
                                       " (no class subfolders: no labels)") +
             f", resized to {want[1]}x{want[2]}, {_PIL_MODES[want[0]]}"]
    return Data(_normalized(x, normalize, str(root)), y, str(root), classes, notes)


def load_data(spec: str | Path, input_shape=None, *, split: str = "train", normalize=None,
              limit: int | None = None, progress: bool = False) -> Data:
    """The user's calibration or evaluation data, as the network's float32 input.

    ``spec``: a ``.npy`` (images only), a ``.npz`` (images and labels under ``x``/``y`` or
    ``data``/``label``), an image folder (``load_image_folder``), or a bundled set:
    ``fmnist`` (Fashion-MNIST, ``split`` ``train`` or ``test``; ``fmnist:test`` names the
    split).  ``input_shape`` (with a batch dimension, e.g. ``(1, 3, 224, 224)``): what the
    model takes; arrays are checked against it, an image folder is read at its size.
    ``normalize=(mean, std)`` applies to pixels: an image folder's, Fashion-MNIST's and
    integer arrays' (scaled to [0, 1] first); float arrays are taken as the network's input
    as they are.  ``limit``: the first ``limit`` images (an image folder: that many drawn
    at random).  Files are read with ``allow_pickle=False``.  Bad input raises
    ``QuantOpsError`` naming the file."""
    if limit is not None and limit < 1:
        raise QuantOpsError(f"{spec}: the image limit must be >= 1, got {limit}")
    text = str(spec)
    if text in BUNDLED_SETS:
        split = text.partition(":")[2] or split
        x, y = fashion_mnist(split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        source = f"fmnist:{split}"
        x = _check_images(x, source, input_shape, [])
        return Data(_normalized(x, normalize, source), y, source,
                    notes=[f"Fashion-MNIST {split}: {len(x)} images" +
                           (", normalized" if normalize is not None else "")])
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path, input_shape, normalize, limit, progress)
    if not path.exists():
        raise QuantOpsError(f"{path}: no such file or folder (give a .npy, a .npz, an image "
                            f"folder or {BUNDLED_SETS[0]})")
    if path.suffix.lower() not in (".npy", ".npz"):
        raise QuantOpsError(f"{path}: not a .npy or .npz file, an image folder or "
                            f"{BUNDLED_SETS[0]}")
    x, y = _read_array_file(path)
    source, notes = str(path), []
    x = _check_images(np.asarray(x), source, input_shape, notes)
    y = check_labels(y, len(x), source)
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
    x = _as_inputs(x, source, normalize, notes)
    notes.insert(0, f"{len(x)} images" + ("" if y is not None else " (no labels)"))
    return Data(x, y, source, notes=notes)
