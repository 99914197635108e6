"""Image datasets of the ``diffkit.images`` plugin: digits, MNIST, Fashion-MNIST, CIFAR-10
and image folders.

The torchvision sets are never downloaded here: each test writes a few images in the
real on-disk format torchvision reads (IDX files for MNIST, pickled batches for
CIFAR-10) and checks that every pixel p comes back as p / 127.5 − 1.
"""

from __future__ import annotations

import pickle
import struct
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import diffkit
from diffkit.errors import DiffkitError, SpecError
from diffkit.spec import data_shape, validate_spec

RNG = np.random.default_rng(0)


def build(config: dict) -> diffkit.Dataset:
    return diffkit.get_registry().build("data", config)


def pixels_to_model(p: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(p).float() / 127.5 - 1


# -- digits ------------------------------------------------------------------------------
def test_digits_all_is_the_whole_bundled_set_in_minus_one_one():
    from sklearn.datasets import load_digits

    ds = build({"type": "digits", "split": "all"})
    x, y = ds.tensors()
    assert ds.kind == "images" and ds.num_classes == 10 and ds.sample_shape == (1, 8, 8)
    assert len(ds) == 1797 and x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    ref = load_digits()  # values 0..16, so 16 ↦ 1 and 0 ↦ −1
    torch.testing.assert_close(x[:, 0], torch.from_numpy(ref.images).float() / 8 - 1, rtol=0, atol=0)
    assert torch.equal(y, torch.from_numpy(ref.target).long())
    assert set(y.tolist()) == set(range(10))
    image, label = ds[5]
    assert image.shape == (1, 8, 8) and int(label) == ref.target[5]


def _rows(ds: diffkit.Dataset) -> Counter:
    x, y = ds.tensors()
    return Counter((img.numpy().tobytes(), int(lab)) for img, lab in zip(x, y))


def test_digits_train_and_test_are_disjoint_cover_all_and_are_fixed():
    train, test, every = (build({"type": "digits", "split": s}) for s in ("train", "test", "all"))
    # Within each digit, round(20%) is held out: 359 images (see digits_split's docstring).
    assert (len(train), len(test)) == (1438, 359)
    rows_train, rows_test = _rows(train), _rows(test)
    assert not set(rows_train) & set(rows_test)  # the 1,797 (image, label) pairs are all distinct
    assert rows_train + rows_test == _rows(every)
    per_digit = torch.bincount(test.tensors()[1], minlength=10)
    assert per_digit.min() >= 35 and per_digit.max() <= 37
    assert torch.equal(build({"type": "digits", "split": "test"}).tensors()[0], test.tensors()[0])


def test_digits_resized():
    ds = build({"type": "digits", "size": 16, "split": "test"})
    x, _ = ds.tensors()
    assert ds.sample_shape == (1, 16, 16) and x.shape == (359, 1, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    assert data_shape({"type": "digits", "size": 16}) == (1, 16, 16)
    assert data_shape({"type": "digits"}) == (1, 8, 8)


# -- MNIST and Fashion-MNIST -------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: a big-endian magic (0, 0, type 0x08 = ubyte, rank), each dimension
    as a big-endian uint32, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train: int = 20, n_test: int = 7) -> dict[bool, tuple]:
    """torchvision's MNIST checks that root/<folder>/raw holds the four unpacked files
    (existence only, no checksum) and reads the split it is asked for."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for train, prefix, n in ((True, "train", n_train), (False, "t10k", n_test)):
        images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, :2] = (0, 255)  # both ends of the range
        labels = RNG.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[train] = (images, labels)
    return out


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("train", [True, False])
def test_mnist_idx_files_round_trip(tmp_path, name, folder, train):
    images, labels = write_mnist(tmp_path, folder)[train]
    ds = build({"type": name, "root": str(tmp_path), "train": train})
    x, y = ds.tensors()
    assert ds.kind == "images" and ds.num_classes == 10 and ds.sample_shape == (1, 28, 28)
    assert x.shape == (len(images), 1, 28, 28)
    assert torch.equal(x[:, 0], pixels_to_model(images))
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8)[:, 0], torch.from_numpy(images))
    assert x[0, 0, 0, 0] == -1 and x[0, 0, 0, 1] == 1
    assert torch.equal(y, torch.from_numpy(labels).long())
    assert data_shape({"type": name, "root": str(tmp_path)}) == (1, 28, 28)


def test_mnist_resized(tmp_path):
    write_mnist(tmp_path, "MNIST")
    ds = build({"type": "mnist", "root": str(tmp_path), "size": 32})
    x, _ = ds.tensors()
    assert x.shape == (20, 1, 32, 32) and ds.sample_shape == (1, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert data_shape({"type": "mnist", "size": 32}) == (1, 32, 32)


# -- CIFAR-10 ----------------------------------------------------------------------------
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 3, n_test: int = 4) -> dict[bool, tuple]:
    """The python version of CIFAR-10: pickled dicts whose 'data' is uint8 [N, 3072], each
    row the 1024 red, then green, then blue values of a 32×32 image in row-major order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {True: [], False: []}
    for name, train, n in [(f"data_batch_{i}", True, per_batch) for i in range(1, 6)] + [("test_batch", False, n_test)]:
        data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}, f)
        batches[train].append((data, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return {train: (np.concatenate([d for d, _ in b]), sum((lab for _, lab in b), [])) for train, b in batches.items()}


@pytest.fixture
def cifar_without_checksums(monkeypatch):
    """torchvision's CIFAR10 checks every file against the MD5 of the real release, which
    no fake can match. The test files stand in for it by clearing the expected sums on the
    class (``check_integrity(path, None)`` checks existence only); the plugin itself runs
    torchvision unchanged, checksums included."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "train_list", [[name, None] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, None] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": None})


@pytest.mark.parametrize("train", [True, False])
def test_cifar10_batches_round_trip(tmp_path, cifar_without_checksums, train):
    data, labels = write_cifar10(tmp_path)[train]
    ds = build({"type": "cifar10", "root": str(tmp_path), "train": train})
    x, y = ds.tensors()
    assert ds.kind == "images" and ds.num_classes == 10 and ds.sample_shape == (3, 32, 32)
    assert ds.classes == CIFAR_CLASSES
    assert x.shape == (len(data), 3, 32, 32)
    assert torch.equal(x, pixels_to_model(data.reshape(-1, 3, 32, 32)))
    i, c, h, w = 1, 2, 5, 17  # one pixel by hand: blue is the third block of 1024
    assert ((x[i, c, h, w] + 1) * 127.5).round() == data[i, c * 1024 + h * 32 + w]
    assert y.tolist() == labels
    resized = build({"type": "cifar10", "root": str(tmp_path), "train": train, "size": 16})
    assert resized.tensors()[0].shape == (len(data), 3, 16, 16)
    assert data_shape({"type": "cifar10", "size": 16}) == (3, 16, 16)


def test_cifar10_files_that_fail_the_checksum_count_as_missing(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DiffkitError, match="CIFAR-10 was not found") as err:
        build({"type": "cifar10", "root": str(tmp_path)})
    assert "MD5" in str(err.value)


# -- missing files -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, folder", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py")]
)
def test_missing_files_give_one_clear_error_naming_the_root(tmp_path, name, folder):
    root = tmp_path / "nowhere"
    with pytest.raises(DiffkitError) as err:
        build({"type": name, "root": str(root)})
    message = str(err.value)
    assert str(root) in message and str(root / folder) in message
    assert "download: true" in message
    assert "\n" not in message and "Traceback" not in message and "RuntimeError" not in message
    assert err.value.__suppress_context__  # raised `from None`: no chained torchvision traceback
    assert not root.exists()  # nothing was created without download: true


@pytest.mark.parametrize("module, name", [("mnist", "mnist"), ("cifar", "cifar10")])
def test_a_failed_download_is_the_same_clear_error(tmp_path, monkeypatch, module, name):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(f"torchvision.datasets.{module}.download_and_extract_archive", offline)
    with pytest.raises(DiffkitError, match="downloading it failed") as err:
        build({"type": name, "root": str(tmp_path), "download": True})
    assert str(tmp_path) in str(err.value) and "download: true" in str(err.value)


def test_corrupt_idx_files_are_reported_as_unreadable(tmp_path):
    write_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    with pytest.raises(DiffkitError, match="could not be read"):
        build({"type": "mnist", "root": str(tmp_path)})


# -- image folders -----------------------------------------------------------------------
RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_folder(root: Path) -> None:
    """Two classes; 'cats' sorts first, so it is label 0. Images are 12 wide × 6 high:
    red on the left half, blue on the right, so the center crop shows where it cut."""
    for cls, n in (("cats", 2), ("dogs", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (12, 6), BLUE)
            img.paste(RED, (0, 0, 6, 6))
            img.save(root / cls / f"{i}.png")
    (root / "dogs" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("in_memory", [None, True, False])
def test_image_folder_labels_size_and_center_crop(tmp_path, in_memory):
    write_folder(tmp_path)
    ds = build({"type": "image-folder", "root": str(tmp_path), "size": 6, "in_memory": in_memory})
    assert ds.kind == "images" and ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert len(ds) == 5 and ds.sample_shape == (3, 6, 6)
    assert (ds.tensors() is None) == (in_memory is False)  # null loads a folder this small
    labels = [int(ds[i][1]) for i in range(len(ds))]
    assert labels == [0, 0, 1, 1, 1]
    x = ds[4][0]
    # The 12×6 image keeps its height (the shorter side is already 6); the center crop
    # takes columns 3..8: three red columns, then three blue.
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    assert x.shape == (3, 6, 6)
    assert torch.equal(x[:, :, :3], red.expand(3, 6, 3)) and torch.equal(x[:, :, 3:], red.flip(0).expand(3, 6, 3))


def test_image_folder_grayscale(tmp_path):
    write_folder(tmp_path)
    ds = build({"type": "image-folder", "root": str(tmp_path), "size": 6, "channels": 1})
    x, y = ds.tensors()
    assert x.shape == (5, 1, 6, 6) and y.tolist() == [0, 0, 1, 1, 1]
    # PIL's grey (ITU-R 601-2 luma) of pure red is 299·255/1000 = 76.245 → 76, of pure blue
    # 114·255/1000 = 29.07 → 29; the crop keeps three columns of each.
    grey = ((x + 1) * 127.5).round()
    assert torch.all(grey[:, 0, :, :3] == 76) and torch.all(grey[:, 0, :, 3:] == 29)


def test_image_folder_resized(tmp_path):
    write_folder(tmp_path)
    ds = build({"type": "image-folder", "root": str(tmp_path), "size": 3, "channels": 1})
    x, _ = ds.tensors()
    assert x.shape == (5, 1, 3, 3) and ds.sample_shape == (1, 3, 3)
    grey = ((x + 1) * 127.5).round()  # the antialiased resize blends red and blue at the seam
    assert grey.min() >= 29 and grey.max() <= 76 and torch.all(grey[..., 0] > grey[..., 2])
    assert data_shape({"type": "image-folder", "root": str(tmp_path), "size": 3, "channels": 1}) == (1, 3, 3)


def test_image_folder_trains_through_a_data_loader(tmp_path):
    write_folder(tmp_path)
    ds = build({"type": "image-folder", "root": str(tmp_path), "size": 4, "in_memory": False})
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert x.shape == (5, 3, 4, 4) and y.dtype == torch.long and y.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("layout", ["missing", "empty", "no class folders", "empty class"])
def test_image_folder_without_images_is_a_clear_error(tmp_path, layout):
    root = tmp_path / "pictures"
    if layout != "missing":
        root.mkdir()
    if layout == "no class folders":
        Image.new("RGB", (4, 4)).save(root / "loose.png")
    if layout == "empty class":
        write_folder(root)
        (root / "birds").mkdir()
    with pytest.raises(DiffkitError) as err:
        build({"type": "image-folder", "root": str(root)})
    message = str(err.value)
    assert str(root) in message and "subfolder" in message and not isinstance(err.value, FileNotFoundError)
    if layout == "empty class":
        assert "birds" in message


# -- specs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, shape",
    [
        ({"type": "digits", "split": "test", "size": 12}, (1, 12, 12)),
        ({"type": "mnist", "root": "data", "download": False, "train": True}, (1, 28, 28)),
        ({"type": "fashion-mnist", "train": False, "size": 14}, (1, 14, 14)),
        ({"type": "cifar10", "root": "/datasets"}, (3, 32, 32)),
        ({"type": "image-folder", "root": "faces", "size": 64, "channels": 1}, (1, 64, 64)),
    ],
)
def test_every_dataset_validates_in_a_spec_without_loading(data, shape):
    spec = validate_spec({"data": data, "denoiser": {"type": "mlp"}})
    assert spec.data.type == data["type"]
    assert data_shape(spec.data) == shape


@pytest.mark.parametrize(
    "data, path",
    [
        ({"type": "digits", "size": 0}, "data.size"),
        ({"type": "digits", "split": "validation"}, "data.split"),
        ({"type": "mnist", "size": -3}, "data.size"),
        ({"type": "cifar10", "colour": True}, "data.colour"),
        ({"type": "image-folder", "root": "x", "channels": 2}, "data.channels"),
        ({"type": "image-folder", "root": "x", "size": 0}, "data.size"),
        ({"type": "image-folder"}, "data.root"),
    ],
)
def test_bad_parameters_name_the_field(data, path):
    with pytest.raises(SpecError) as err:
        validate_spec({"data": data, "denoiser": {"type": "mlp"}})
    assert path in [p for p, _ in err.value.problems]
    with pytest.raises(SpecError) as err:  # building directly reports the same path
        build(data)
    assert path in [p for p, _ in err.value.problems]


def test_digits_train_a_few_steps_through_the_pipeline():
    pipe = diffkit.Pipeline(data={"type": "digits", "split": "test"}, denoiser={"type": "mlp", "hidden": 32, "depth": 1})
    assert pipe.context.sample_shape == (1, 8, 8) and pipe.context.data_kind == "images"
    result = pipe.fit(steps=2, batch_size=16, preview=0, progress=False, device="cpu")
    assert result.steps == 2 and np.isfinite(result.final_loss)
    assert pipe.sample(3, seed=0).shape == (3, 1, 8, 8)
