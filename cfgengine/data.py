"""Class-conditional image datasets for training: `shapes` (procedural, rendered on the fly), `digits`
(scikit-learn's bundled 8×8 digits), `gmm` (`toy.image_mixture`, whose exact ε is known), a folder of
class sub-folders, and an `.npz` of uint8 NHWC images `x` with labels `y`.

Every dataset yields float32 images in [−1, 1] (docs/design.md §1) shaped [N, C, H, W] with int64 labels
in [0, K), and carries its `DatasetInfo`. Batches are drawn with a caller-owned torch.Generator, so
saving that generator's state is all a resumable training run needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfgengine import toy

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SHAPE_NAMES = ("circle", "ring", "square", "frame", "triangle", "cross", "bar", "crescent")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on the dataset needs to know: its name, classes and image shape."""

    name: str
    class_names: tuple[str, ...]
    shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageDataset:
    """Base: `info`, and `batch(n, generator) -> (x [n, C, H, W] in [−1, 1], y [n])`."""

    info: DatasetInfo

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape

    def examples(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Images [N, C, H, W] of the given classes, drawn at random."""
        raise NotImplementedError

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n random (image, label) pairs, classes uniform."""
        y = torch.randint(self.num_classes, (n,), generator=generator)
        return self.examples(y, generator), y


class ArrayDataset(ImageDataset):
    """A finite set held in memory; batches are drawn uniformly with replacement."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo):
        check_arrays(x, y, info)
        self.x, self.y, self.info = x, y, info

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n random (image, label) pairs, classes as frequent as in the data."""
        index = torch.randint(len(self.y), (n,), generator=generator)
        return self.x[index], self.y[index]

    def examples(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        order = torch.argsort(self.y, stable=True)  # indices grouped by class
        counts = torch.bincount(self.y, minlength=self.num_classes)
        if bool((counts[labels] == 0).any()):
            raise ValueError(f"{self.info.name}: no images of a requested class")
        starts = torch.cumsum(counts, 0) - counts
        offset = (torch.rand(labels.shape, generator=generator) * counts[labels]).long()
        return self.x[order[starts[labels] + offset]]

    def split(self, holdout: float, seed: int = 0) -> tuple["ArrayDataset", "ArrayDataset"]:
        """(train, held-out) by a seeded permutation; `holdout` is the held-out fraction."""
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(seed))
        cut = len(order) - int(round(holdout * len(order)))
        return (ArrayDataset(self.x[order[:cut]], self.y[order[:cut]], self.info),
                ArrayDataset(self.x[order[cut:]], self.y[order[cut:]], self.info))


def check_arrays(x: torch.Tensor, y: torch.Tensor, info: DatasetInfo) -> None:
    """Raise ValueError unless x is float [N, *info.shape] in [−1, 1] and y int64 [N] in [0, K)."""
    if x.dim() != 4 or tuple(x.shape[1:]) != info.shape:
        raise ValueError(f"{info.name}: images must be [N, {', '.join(map(str, info.shape))}], "
                         f"got {list(x.shape)}")
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise ValueError(f"{info.name}: labels must be int64 [{x.shape[0]}], got {y.dtype} {list(y.shape)}")
    if len(y) == 0:
        raise ValueError(f"{info.name}: dataset is empty")
    if y.min() < 0 or y.max() >= info.num_classes:
        raise ValueError(f"{info.name}: labels must lie in [0, {info.num_classes}), "
                         f"got [{int(y.min())}, {int(y.max())}]")
    if x.min() < -1 or x.max() > 1:
        raise ValueError(f"{info.name}: pixel values must lie in [-1, 1]")


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW in [−1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class Shapes(ImageDataset):
    """Procedural shapes, one class per shape, rendered anti-aliased on the fly. Within a class the
    colour, size, position, rotation and background (colour and gradient) vary, so a guided model can
    visibly trade this diversity for class fidelity."""

    def __init__(self, image_size: int = 16):
        if image_size < 8:
            raise ValueError(f"shapes: image size must be at least 8, got {image_size}")
        self.info = DatasetInfo("shapes", SHAPE_NAMES, (3, image_size, image_size))

    def examples(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return render_shapes(labels, self.info.shape[1], generator)


def render_shapes(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images [N, 3, size, size] in [−1, 1] of the shapes `labels` (indices into SHAPE_NAMES)."""
    n = len(labels)
    scale = _uniform(generator, 0.45, 0.75, n)  # half-extent in image coordinates [−1, 1]
    centre = _uniform(generator, -1, 1, n, 2) * (0.95 - scale)[:, None]
    theta = _uniform(generator, 0, 2 * math.pi, n)
    fg, bg = _colours(n, generator)  # (N, 3) each
    gradient = _uniform(generator, -0.15, 0.15, n, 2)
    coord = (torch.arange(size) + 0.5) / size * 2 - 1
    py, px = torch.meshgrid(coord, coord, indexing="ij")  # (H, W)
    dx, dy = px - centre[:, 0, None, None], py - centre[:, 1, None, None]  # (N, H, W)
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    s = scale[:, None, None]
    x, y = (cos * dx + sin * dy) / s, (cos * dy - sin * dx) / s  # shape-local coordinates
    sdf = torch.stack([f(x, y) for f in _SDFS], dim=1)  # (N, K, H, W)
    sdf = sdf.gather(1, labels[:, None, None, None].expand(n, 1, size, size))[:, 0]
    pixel = 2.0 / size / s  # one pixel in local units: anti-aliasing width
    mask = (0.5 - sdf / pixel).clamp(0, 1)[:, None]  # (N, 1, H, W)
    shade = gradient[:, 0, None, None] * px + gradient[:, 1, None, None] * py
    background = bg[:, :, None, None] + shade[:, None]  # (N, 3, H, W)
    image = background * (1 - mask) + fg[:, :, None, None] * mask
    return image.clamp(0, 1) * 2 - 1


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _colours(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) RGB in [0, 1]: a vivid and a dull colour of random hues, with
    contrast in value; in half the images the dark one is the shape."""
    vivid = _hsv_to_rgb(_uniform(generator, 0, 1, n), _uniform(generator, 0.5, 1, n),
                        _uniform(generator, 0.75, 1, n))
    dull = _hsv_to_rgb(_uniform(generator, 0, 1, n), _uniform(generator, 0, 0.6, n),
                       _uniform(generator, 0.05, 0.35, n))
    swap = (torch.rand(n, generator=generator) < 0.5)[:, None]
    return torch.where(swap, dull, vivid), torch.where(swap, vivid, dull)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV [N] each → RGB [N, 3]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6  # (N, 3)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return v[:, None] * (1 - s[:, None] * ramp)


def _box(x: torch.Tensor, y: torch.Tensor, half_x: float, half_y: float) -> torch.Tensor:
    return torch.maximum(x.abs() - half_x, y.abs() - half_y)


def _triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Equilateral triangle with circumradius 1 (inradius 0.5)."""
    angles = torch.tensor([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * math.pi
    dist = [ca * x + sa * y for ca, sa in zip(angles.cos().tolist(), angles.sin().tolist())]
    return torch.stack(dist).amax(0) - 0.5


# Signed-distance-like functions in shape-local units (negative inside), in SHAPE_NAMES order.
_SDFS = (
    lambda x, y: torch.hypot(x, y) - 1,
    lambda x, y: (torch.hypot(x, y) - 0.72).abs() - 0.28,
    lambda x, y: _box(x, y, 0.85, 0.85),
    lambda x, y: (torch.maximum(x.abs(), y.abs()) - 0.62).abs() - 0.24,
    _triangle,
    lambda x, y: torch.minimum(_box(x, y, 0.3, 0.95), _box(x, y, 0.95, 0.3)),
    lambda x, y: _box(x, y, 1.0, 0.28),
    lambda x, y: torch.maximum(torch.hypot(x, y) - 1, 0.75 - torch.hypot(x - 0.55, y)),
)


class Mixture(ImageDataset):
    """`toy.image_mixture` as a dataset. Samples are NOT clipped to [−1, 1] (a few Gaussian tails
    pass it): clipping would change the density whose exact ε the tests compare against."""

    def __init__(self, mixture: toy.GaussianMixture | None = None):
        self.mixture = mixture if mixture is not None else toy.image_mixture()
        names = tuple(f"mode{k}" for k in range(self.mixture.num_classes))
        self.info = DatasetInfo("gmm", names, tuple(self.mixture.sample_shape))

    def examples(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.mixture.sample_data(labels, generator)


def digits() -> ArrayDataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes), grey levels 0..16."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ValueError("the digits dataset needs scikit-learn: pip install 'cfgengine[data]'") from err
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] / 8.0 - 1.0  # (N, 1, 8, 8)
    info = DatasetInfo("digits", tuple(str(d) for d in range(10)), (1, 8, 8))
    return ArrayDataset(x, torch.from_numpy(bunch.target).long(), info)


def folder(root: str | Path, image_size: int | None = None) -> ArrayDataset:
    """Images under root/<class name>/*, read as RGB; class names sorted. All images must share one
    square size unless `image_size` is given, in which case each is resized to it."""
    root = Path(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders")
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{class_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        images += [_read_image(f, image_size) for f in files]
        labels += [label] * len(files)
    _check_same_shape(images, root)
    info = DatasetInfo(root.name, tuple(d.name for d in class_dirs), _chw(images[0].shape, root))
    return ArrayDataset(from_uint8(np.stack(images)), torch.tensor(labels), info)


def _read_image(path: Path, image_size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if image_size is not None:
                img = img.resize((image_size, image_size), Image.BICUBIC)
            return np.asarray(img)
    except OSError as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err


def _check_same_shape(images: list[np.ndarray], root: Path) -> None:
    for img in images:
        if img.shape != images[0].shape:
            raise ValueError(f"{root}: images differ in size ({images[0].shape[:2]} vs "
                             f"{img.shape[:2]}); pass an image size to resize them")


def _chw(hwc: tuple[int, ...], source: Path) -> tuple[int, int, int]:
    """NHWC image shape → (C, H, W), rejecting non-square images and channel counts other than 1, 3."""
    height, width, channels = hwc
    if height != width:
        raise ValueError(f"{source}: images must be square, got {height}×{width}")
    if channels not in (1, 3):
        raise ValueError(f"{source}: images must have 1 or 3 channels, got {channels}")
    return (channels, height, width)


def npz(path: str | Path) -> ArrayDataset:
    """An .npz with `x` uint8 [N, H, W, C] (C = 1 or 3), `y` integer [N], optional `class_names`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
            names = arrays["class_names"].tolist() if "class_names" in arrays else None
    except KeyError as err:
        raise ValueError(f"{path}: needs arrays 'x' (uint8 NHWC) and 'y' (labels); missing {err}") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz ({err})") from err
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{path}: 'x' must be uint8 [N, H, W, C], got {x.dtype} {list(x.shape)}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ValueError(f"{path}: 'y' must be integer [N], got {y.dtype} {list(y.shape)}")
    if names is None:
        classes = int(y.max()) + 1 if len(y) else 0
        if classes > len(y):  # 1e9 would build a billion names (MemoryError) and a huge table
            raise ValueError(f"{path}: labels go up to {classes - 1} for {len(y)} examples; "
                             "labels must be class ids 0..K-1")
        names = [str(k) for k in range(classes)]
    info = DatasetInfo(path.stem, tuple(str(n) for n in names), _chw(x.shape[1:], path))
    return ArrayDataset(from_uint8(x), torch.from_numpy(y.astype(np.int64)), info)


BUILTIN_DATASETS = ("shapes", "digits", "gmm")


def load_dataset(spec: str, image_size: int | None = None) -> ImageDataset:
    """`shapes`, `digits`, `gmm`, a folder of class sub-folders, or an `.npz` file."""
    if not str(spec).strip():  # Path("") is the current folder: never a dataset by accident
        raise ValueError("--data is empty: give shapes, digits, gmm, a folder or an .npz file")
    if spec == "shapes":
        return Shapes(16 if image_size is None else image_size)  # 0 is an error, not 16
    if spec in ("digits", "gmm"):
        dataset = digits() if spec == "digits" else Mixture()
        if image_size not in (None, dataset.shape[1]):
            raise ValueError(f"{spec}: images are {dataset.shape[1]}×{dataset.shape[1]}, "
                             f"got image size {image_size}")
        return dataset
    path = Path(spec)
    if path.is_dir():
        return folder(path, image_size)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such dataset file or folder, and not a built-in "
                                f"dataset ({', '.join(BUILTIN_DATASETS)})")
    if path.suffix != ".npz":
        raise ValueError(f"{spec}: a dataset file must be .npz (arrays x, y)")
    return npz(path)
