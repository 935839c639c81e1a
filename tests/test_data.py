"""Datasets: images in [−1, 1] with the declared shape and classes; loaders reject bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from cfgengine.data import SHAPE_NAMES, ArrayDataset, load_dataset, render_shapes


def _check_batch(dataset, n: int = 40):
    x, y = dataset.batch(n, torch.Generator().manual_seed(0))
    assert x.shape == (n, *dataset.shape) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < dataset.num_classes
    assert len(dataset.class_names) == dataset.num_classes
    return x, y


def test_shapes_batches_are_images_in_range_and_seeded():
    dataset = load_dataset("shapes", 16)
    x, y = _check_batch(dataset)
    assert x.min() >= -1 and x.max() <= 1
    assert dataset.class_names == SHAPE_NAMES and len(SHAPE_NAMES) >= 8
    x2, y2 = dataset.batch(40, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_shapes_vary_within_a_class():
    """Colour, size, position and rotation differ: no two images of one class are alike, and every
    pixel position varies across the class (the shape is not always in the same place)."""
    x = render_shapes(torch.zeros(64, dtype=torch.long), 16, torch.Generator().manual_seed(1))
    flat = x.reshape(64, -1)
    distances = torch.cdist(flat, flat) + torch.eye(64) * 1e9
    assert distances.min() > 1.0
    assert x.std(dim=0).min() > 0.2


def test_gmm_dataset_is_the_image_mixture():
    dataset = load_dataset("gmm")
    _check_batch(dataset)
    assert dataset.shape == tuple(dataset.mixture.sample_shape)


def test_digits_dataset():
    pytest.importorskip("sklearn")
    dataset = load_dataset("digits")
    x, _ = _check_batch(dataset)
    assert dataset.shape == (1, 8, 8) and dataset.num_classes == 10 and len(dataset) == 1797
    assert x.min() >= -1 and x.max() <= 1


def test_examples_have_the_requested_classes():
    pytest.importorskip("sklearn")
    dataset = load_dataset("digits")
    labels = torch.tensor([3, 3, 0, 9])
    x = dataset.examples(labels, torch.Generator().manual_seed(0))
    for image, label in zip(x, labels):
        match = (dataset.x == image).flatten(1).all(1)
        assert dataset.y[match].eq(label).all() and match.any()


def _write_npz(path, x, y, **extra):
    np.savez(path, x=x, y=y, **extra)
    return str(path)


def test_npz_round_trip(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    dataset = load_dataset(_write_npz(tmp_path / "d.npz", x, np.array([0, 1, 2, 0, 1, 2]),
                                      class_names=np.array(["a", "b", "c"])))
    assert dataset.shape == (3, 4, 4) and dataset.class_names == ("a", "b", "c")
    np.testing.assert_allclose(((dataset.x + 1) * 127.5).round().numpy(),
                               x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("x, y, extra, message", [
    (np.zeros((2, 4, 4, 3), np.float32), [0, 1], {}, "uint8"),
    (np.zeros((2, 4, 4), np.uint8), [0, 1], {}, "uint8"),
    (np.zeros((2, 4, 5, 3), np.uint8), [0, 1], {}, "square"),
    (np.zeros((2, 4, 4, 2), np.uint8), [0, 1], {}, "channels"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0, 1, 1], {}, r"labels must be int64 \[2\]"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0, -1], {}, "labels must lie"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0.0, 1.0], {}, "integer"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0, 2], {"class_names": np.array(["a", "b"])},
     r"labels must lie in \[0, 2\)"),
])
def test_npz_rejects_bad_arrays(tmp_path, x, y, extra, message):
    path = _write_npz(tmp_path / "bad.npz", x, np.array(y), **extra)
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_npz_without_arrays(tmp_path):
    np.savez(tmp_path / "other.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="needs arrays 'x'"):
        load_dataset(str(tmp_path / "other.npz"))


def _image_folder(root, sizes: dict[str, list[int]]):
    for name, class_sizes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, size in enumerate(class_sizes):
            Image.new("RGB", (size, size), (10 * i, 100, 200)).save(root / name / f"{i}.png")
    return str(root)


def test_folder_dataset(tmp_path):
    dataset = load_dataset(_image_folder(tmp_path / "data", {"cat": [8, 8], "dog": [8]}))
    assert dataset.class_names == ("cat", "dog") and dataset.shape == (3, 8, 8)
    assert dataset.y.tolist() == [0, 0, 1]


def test_folder_rejects_mixed_sizes_unless_resized(tmp_path):
    root = _image_folder(tmp_path / "data", {"a": [8], "b": [6]})
    with pytest.raises(ValueError, match="differ in size"):
        load_dataset(root)
    assert load_dataset(root, image_size=4).shape == (3, 4, 4)


def test_folder_rejects_empty_class_and_non_images(tmp_path):
    root = tmp_path / "data"
    (root / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_dataset(str(root))
    (root / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_dataset(str(root))


def test_array_dataset_checks_ranges():
    from cfgengine.data import DatasetInfo

    info = DatasetInfo("t", ("a", "b"), (1, 2, 2))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ArrayDataset(torch.full((1, 1, 2, 2), 2.0), torch.tensor([0]), info)
    with pytest.raises(ValueError, match="images must be"):
        ArrayDataset(torch.zeros(1, 3, 2, 2), torch.tensor([0]), info)


def test_unknown_datasets():
    with pytest.raises(FileNotFoundError, match="not a built-in dataset"):
        load_dataset("no/such/dataset")
    with pytest.raises(ValueError, match="images are 8"):
        load_dataset("gmm", image_size=16)
