"""Raw data access: the data-root rules, the offline error, balanced subsets."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pixgen import PixgenError, data


def test_loads_full_mnist_from_data_root(data_root):
    images, labels = data.load("mnist", "test", root=data_root)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    fashion, _ = data.load("fashion-mnist", "test", root=data_root)
    assert fashion.shape == (10000, 28, 28) and not np.array_equal(fashion[:100], images[:100])


def test_validation_is_the_held_out_end_of_the_training_split(data_root):
    train, train_labels = data.load("mnist", "train", root=data_root)
    val, val_labels = data.load("mnist", "validation", root=data_root)
    raw = data._load("mnist", str(data_root), True)
    assert (len(train), len(val)) == (55000, 5000)
    assert np.array_equal(np.concatenate([train, val]), raw[0]) and np.array_equal(np.concatenate([train_labels, val_labels]), raw[1])
    assert min(np.bincount(val_labels)) > 400  # every class is checked
    with pytest.raises(PixgenError, match="unknown split 'val'; choose one of train, validation, test"):
        data.load("mnist", "val", root=data_root)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_the_numpy_reader_gives_torchvisions_arrays(dataset, data_root):
    from torchvision import datasets

    for train in (True, False):
        images, labels = data._load(dataset, str(data_root), train)
        reference = getattr(datasets, data.spec(dataset).torchvision)(str(data_root), train=train)
        assert np.array_equal(images, reference.data.numpy()) and np.array_equal(labels, reference.targets.numpy())
        assert images.dtype == np.uint8 and labels.dtype == np.int64 and not (images.flags.writeable or labels.flags.writeable)


def test_a_truncated_raw_file_is_one_clear_error(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.RAW_FILES:
        (raw / name).write_bytes((data_root / "MNIST" / "raw" / name).read_bytes())
    with open(raw / "t10k-images-idx3-ubyte", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(PixgenError, match="t10k-images-idx3-ubyte is not an intact IDX file") as err:
        data._load("mnist", str(tmp_path), False)
    assert "\n" not in str(err.value)


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXGEN_DATA_ROOT", str(tmp_path / "env"))
    assert data.data_root(tmp_path / "opt") == tmp_path / "opt"
    assert data.data_root() == tmp_path / "env"
    monkeypatch.delenv("PIXGEN_DATA_ROOT")
    assert str(data.data_root()) == "data/raw"


def test_missing_data_names_folder_and_files(monkeypatch, tmp_path):
    # No network in tests: make torchvision's download fail the way it does offline.
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tvu, "_get_redirect_url", offline)
    monkeypatch.setattr(tvu, "_urlretrieve", offline)
    with pytest.raises(PixgenError) as err:
        data.load("mnist", "train", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg and "\n" not in msg
    assert not any(tmp_path.iterdir())  # the empty folders torchvision made for the download are gone


def test_balanced_subset_is_fixed_and_balanced(data_root):
    _, labels = data.load("mnist", "train", root=data_root)
    a = data.balanced_subset(labels, 1003, seed=0)
    assert len(a) == 1003 and len(np.unique(a)) == 1003
    counts = np.bincount(labels[a])
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(a, data.balanced_subset(labels, 1003, seed=0))
    assert not np.array_equal(a, data.balanced_subset(labels, 1003, seed=1))
    assert len(data.balanced_subset(labels, None)) == len(labels)


def test_dataset_identity_tracks_content(data_root):
    images, labels = data.load("mnist", "test", root=data_root)
    assert data.identity(images[:100], labels[:100]) == data.identity(images[:100].copy(), labels[:100].copy())
    assert data.identity(images[:100], labels[:100]) != data.identity(images[1:101], labels[1:101])


def test_dataset_identity_is_the_hash_recorded_in_existing_assets(data_root):
    """The SHA-256 of the C-order bytes of images then labels, as assets made before recorded it,
    also for strided and Fortran-order slices."""
    images, labels = data.load("mnist", "train", data_root)
    for im, lb in [(images[:500], labels[:500]), (images[::7], labels[::7]), (np.asfortranarray(images[:50]), labels[:50])]:
        recorded = hashlib.sha256(np.ascontiguousarray(im).tobytes() + np.ascontiguousarray(lb).tobytes()).hexdigest()[:16]
        assert data.identity(im, lb) == recorded
