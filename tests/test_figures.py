"""Sample figures: the uint8 conversion, the image grid layout, and panel files for points and
images."""
import numpy as np
import pytest
import torch
from PIL import Image

from cfgengine.figures import image_grid, save_panels, to_uint8_images


def test_to_uint8_maps_the_data_range_and_clamps_outside_it():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(5, 1, 1, 1)
    assert to_uint8_images(x).reshape(-1).tolist() == [0, 0, 128, 255, 255]
    assert to_uint8_images(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)  # NHWC


def test_image_grid_places_images_in_row_order_with_white_padding():
    images = np.stack([np.full((2, 3, 1), k, np.uint8) for k in range(6)])  # 6 images 2×3
    grid = image_grid(images, rows=2, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()
    for k in range(6):
        r, c = divmod(k, 3)
        top, left = 1 + r * 3, 1 + c * 4
        assert (grid[top:top + 2, left:left + 3] == k).all()


@pytest.mark.parametrize("shape", [(2,), (3, 8, 8)])
def test_save_panels_writes_one_png_with_a_panel_per_w(tmp_path, shape):
    labels = torch.tensor([0, 0, 1, 1])
    panels = [(w, torch.rand(4, *shape) * 2 - 1, labels) for w in (0.0, 4.0)]
    path = tmp_path / "panels.png"
    save_panels(path, panels, ["a", "b"])
    width, height = Image.open(path).size
    assert width > height  # two panels side by side
