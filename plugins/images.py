"""Image datasets: ``digits`` (offline), ``mnist``, ``fashion-mnist``, ``cifar10`` and
``image-folder``. Every one yields ``(C, H, W)`` float images in [-1, 1] with integer labels.

``digits`` is scikit-learn's bundled copy of the UCI handwritten digits, so it needs no
files and no network. The torchvision sets are read from ``root`` (or downloaded into it
with ``download: true``) and held in memory as tensors, so training indexes them on the
device instead of decoding images every step.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor

from diffkit import BuildContext, Component, Dataset, DiffkitError, Params, TensorData, hookimpl

# torchvision and scikit-learn are imported inside the factories: every diffkit command
# loads this plugin, and importing them costs more than most commands take.

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
IN_MEMORY_LIMIT_BYTES = 1 << 30
"""``image-folder`` with ``in_memory: null`` loads the folder when its decoded tensors fit in this."""


class _SizeParams(Params):
    size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Resize every image to size × size (bilinear, antialiased); null keeps the native size.",
    )


class DigitsParams(_SizeParams):
    """scikit-learn's handwritten digits: 1,797 grey 8×8 images of 0–9, bundled offline."""

    split: Literal["train", "test", "all"] = Field(
        "train",
        description=(
            "Which images: a fixed stratified split holds out 20% of each digit as 'test'"
            " (the same images on every machine); 'all' takes all 1,797."
        ),
    )


class TorchvisionParams(_SizeParams):
    """A torchvision dataset, loaded whole into memory."""

    root: str = Field("data", description="Directory holding the dataset's files (torchvision's layout).")
    download: bool = Field(False, description="Download the files into root if they are missing (needs internet).")
    train: bool = Field(True, description="The training set; false takes the test set.")


class ImageFolderParams(Params):
    """Any folder of images with one subfolder per class (``root/<class>/<image>``)."""

    root: str = Field(..., description="Folder with one subfolder of images per class; labels follow sorted folder names.")
    size: int = Field(32, ge=1, le=1024, description="Resize the shorter side to size, then center-crop to size × size.")
    channels: Literal[1, 3] = Field(3, description="1 converts to grayscale, 3 to RGB.")
    in_memory: bool | None = Field(
        None,
        description=(
            "Decode every image once and keep them as tensors (fast training) or read files on demand;"
            " null loads into memory when the decoded images take at most 1 GiB."
        ),
    )


# -- shared helpers ----------------------------------------------------------------------
def _to_model_space(pixels: Tensor) -> Tensor:
    """uint8 pixels p ∈ {0..255} → p / 127.5 − 1 ∈ [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def _resize(x: Tensor, size: int | None, chunk: int = 4096) -> Tensor:
    """Resize a batch [N, C, H, W] to size × size, in chunks to bound the peak memory.

    Antialiased bilinear weights are non-negative and sum to one, so [-1, 1] is kept up
    to rounding, which the clamp removes."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    parts = [
        F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        for part in x.split(chunk)
    ]
    return torch.cat(parts).clamp_(-1.0, 1.0)


class ImageTensors(TensorData):
    """Images held in memory, with the names of their classes."""

    def __init__(self, x: Tensor, y: Tensor, classes: Sequence[str]) -> None:
        super().__init__(x, y, num_classes=len(classes), kind="images")
        self.classes = list(classes)


# -- digits ------------------------------------------------------------------------------
def digits_split(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the held-out 'test' images: within each digit, a permutation by
    ``numpy.random.RandomState(0)`` (whose stream NumPy keeps fixed across versions) puts
    the first round(20%) in test. That holds out 359 of the 1,797 images (35 to 37 per
    digit) and trains on 1,438."""
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[: round(DIGITS_TEST_FRACTION * len(idx))]] = True
    return test


def digits(params: DigitsParams, ctx: BuildContext) -> ImageTensors:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images, bunch.target  # float64 in 0..16, shape [1797, 8, 8]
    if params.split != "all":
        test = digits_split(labels)
        keep = test if params.split == "test" else ~test
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(rearrange(images, "n h w -> n 1 h w")).float() / 8.0 - 1.0
    return ImageTensors(_resize(x, params.size), torch.from_numpy(labels), [str(d) for d in range(10)])


def _digits_shape(params: DigitsParams) -> tuple[int, ...]:
    side = params.size or 8
    return (1, side, side)


# -- mnist, fashion-mnist, cifar10 -------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """How to find one torchvision dataset and what its files look like."""

    title: str
    cls: str  # the class in torchvision.datasets
    channels: int
    side: int
    folder: str  # where torchvision looks for the files, relative to root
    contents: str  # what belongs there

    def shape(self, params: TorchvisionParams) -> tuple[int, ...]:
        side = params.size or self.side
        return (self.channels, side, side)


_IDX = "the four unpacked IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
MNIST = _Source("MNIST", "MNIST", 1, 28, "MNIST/raw", _IDX)
FASHION_MNIST = _Source("Fashion-MNIST", "FashionMNIST", 1, 28, "FashionMNIST/raw", _IDX)
CIFAR10 = _Source(
    "CIFAR-10",
    "CIFAR10",
    3,
    32,
    "cifar-10-batches-py",
    "cifar-10-python.tar.gz unpacked: data_batch_1 to data_batch_5, test_batch, batches.meta;"
    " torchvision checks their MD5 sums, so altered or partial files count as missing",
)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The error's message on one line (torchvision's download errors span several)."""
    text = " ".join(str(exc).split()) or "no message"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _where(root: str) -> str:
    full = os.path.abspath(root)
    return f"'{root}'" if full == root else f"'{root}' ({full})"


def _missing(source: _Source, root: str, download_error: Exception | None) -> DiffkitError:
    where = os.path.abspath(root)
    tried = ""
    if download_error is not None:
        tried = f" and downloading it failed ({type(download_error).__name__}: {_one_line(download_error)})"
    return DiffkitError(
        f"{source.title} was not found under root {_where(root)}{tried}."
        f" Set download: true on a machine with internet access, or place the files under"
        f" {os.path.join(where, source.folder)} ({source.contents})."
    )


def _load_torchvision(source: _Source, params: TorchvisionParams, ctx: BuildContext) -> ImageTensors:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, source.cls)
    try:
        ds = cls(params.root, train=params.train, download=params.download)
    except (RuntimeError, OSError) as exc:  # URLError is an OSError: no network, or a refused mirror
        if params.download or "not found" in str(exc).lower():  # torchvision: "Dataset not found ..."
            raise _missing(source, params.root, exc if params.download else None) from None
        raise _unreadable(source, params.root, exc) from None
    except (ValueError, TypeError, AssertionError, EOFError, KeyError, pickle.UnpicklingError) as exc:
        raise _unreadable(source, params.root, exc) from None
    pixels = torch.as_tensor(ds.data)  # MNIST: uint8 [N, H, W]; CIFAR-10: uint8 [N, H, W, C]
    pixels = rearrange(pixels, "n h w -> n 1 h w") if pixels.ndim == 3 else rearrange(pixels, "n h w c -> n c h w")
    x = _resize(_to_model_space(pixels), params.size)
    return ImageTensors(x, torch.as_tensor(ds.targets, dtype=torch.long), ds.classes)


def _unreadable(source: _Source, root: str, exc: BaseException) -> DiffkitError:
    return DiffkitError(
        f"the {source.title} files under {os.path.join(os.path.abspath(root), source.folder)} could not be read"
        f" ({type(exc).__name__}: {_one_line(exc)}); delete them and download them again"
    )


# -- image-folder ------------------------------------------------------------------------
def _open_image(path: str, mode: str) -> Any:
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


class ImageFolderData(Dataset):
    """A folder of images read from disk, ``root/<class>/<image>``; labels index the sorted
    class names. ``tensors()`` is None until :meth:`load` decodes everything into memory."""

    kind = "images"

    def __init__(self, params: ImageFolderParams) -> None:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        root = params.root
        if not os.path.isdir(root):
            raise DiffkitError(
                f"image folder {_where(root)} does not exist or is not a directory;"
                " set root to a folder with one subfolder of images per class"
            )
        self.transform = transforms.Compose(
            [
                transforms.Resize(params.size, antialias=True),
                transforms.CenterCrop(params.size),
                transforms.PILToTensor(),
                _to_model_space,
            ]
        )
        try:
            # partial, not a lambda, so that DataLoader workers can pickle the loader
            self.folder = ImageFolder(root, loader=partial(_open_image, mode="L" if params.channels == 1 else "RGB"))
        except FileNotFoundError as exc:  # no class subfolders, or a class with no images
            raise DiffkitError(
                f"image folder {_where(root)} has no usable images: {_one_line(exc)}"
                " Put the images in one subfolder per class (root/<class>/<image>.png; a single subfolder"
                " for unlabelled data)."
            ) from None
        self.classes = list(self.folder.classes)
        self.num_classes = len(self.classes)
        self.sample_shape = (params.channels, params.size, params.size)
        self._tensors: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if self._tensors is not None:
            return self._tensors[0][i], self._tensors[1][i]
        path, label = self.folder.samples[i]
        return self.transform(self.folder.loader(path)), torch.tensor(label)

    def nbytes(self) -> int:
        """The size of every image decoded as float32."""
        return len(self) * math.prod(self.sample_shape) * 4

    def load(self) -> ImageFolderData:
        """Decode every image once and keep them in memory."""
        if self._tensors is None:
            x = torch.empty(len(self), *self.sample_shape)
            for i in range(len(self)):
                x[i] = self[i][0]
            self._tensors = (x, torch.as_tensor(self.folder.targets, dtype=torch.long))
        return self

    def tensors(self) -> tuple[Tensor, Tensor] | None:
        return self._tensors


def image_folder(params: ImageFolderParams, ctx: BuildContext) -> ImageFolderData:
    ds = ImageFolderData(params)
    if params.in_memory or (params.in_memory is None and ds.nbytes() <= IN_MEMORY_LIMIT_BYTES):
        ds.load()
    return ds


def _check_image_folder(params: ImageFolderParams) -> list[tuple[str, str]]:
    """The folder exists and every class subfolder holds an image, by the rules
    torchvision's ImageFolder applies when training loads it; one image per class is
    enough to know, so a large folder is not walked whole."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    root = params.root
    fix = "set root to a folder with one subfolder of images per class (root/<class>/<image>.png)"
    if not os.path.exists(root):
        return [("root", f"image folder {_where(root)} does not exist; {fix}")]
    if not os.path.isdir(root):
        return [("root", f"{_where(root)} is not a directory; {fix}")]
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as exc:
        return [("root", f"image folder {_where(root)} cannot be read ({exc.strerror}); {fix}")]
    if not classes:
        return [
            ("root", f"image folder {_where(root)} has no class subfolders; {fix} (one subfolder for unlabelled data)")
        ]

    def has_image(folder: str) -> bool:
        for _, _, files in os.walk(folder, followlinks=True):
            if any(has_file_allowed_extension(f, IMG_EXTENSIONS) for f in files):
                return True
        return False

    empty = [c for c in classes if not has_image(os.path.join(root, c))]
    if empty:
        return [
            (
                "root",
                f"image folder {_where(root)} has no images in class folder(s) {', '.join(empty)}"
                f" (images are files ending {', '.join(IMG_EXTENSIONS)}); add images or remove those folders",
            )
        ]
    return []


def _image_folder_shape(params: ImageFolderParams) -> tuple[int, ...]:
    return (params.channels, params.size, params.size)


@hookimpl
def diffkit_datasets() -> list[Component]:
    def torchvision_set(name: str, source: _Source, what: str) -> Component:
        return Component(
            name,
            partial(_load_torchvision, source),
            TorchvisionParams,
            f"{what} (torchvision), in memory.",
            data_shape=source.shape,
        )

    return [
        Component("digits", digits, DigitsParams, "Handwritten digits 8×8 (scikit-learn, offline).", data_shape=_digits_shape),
        torchvision_set("mnist", MNIST, "MNIST handwritten digits 28×28"),
        torchvision_set("fashion-mnist", FASHION_MNIST, "Fashion-MNIST clothing 28×28"),
        torchvision_set("cifar10", CIFAR10, "CIFAR-10 colour images 32×32"),
        Component(
            "image-folder",
            image_folder,
            ImageFolderParams,
            "A folder of images, one subfolder per class.",
            data_shape=_image_folder_shape,
            check_inputs=_check_image_folder,
        ),
    ]
