"""PNG grids: layout, dtype handling, atomic writes."""

import numpy as np
import pytest
from PIL import Image

from shared.grids import make_grid, save_grid, to_uint8


def test_make_grid_layout_row_major_with_blank_padding():
    images = np.stack([np.full((2, 3, 3), i * 40, np.uint8) for i in range(5)])
    grid = make_grid(images, rows=2)
    assert grid.shape == (4, 9, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 40 and grid[0, 6, 0] == 80  # first row
    assert grid[2, 0, 0] == 120 and grid[2, 3, 0] == 160  # second row
    assert np.all(grid[2:, 6:] == 0)  # blank where no sixth image exists


def test_bad_shapes_and_rows():
    with pytest.raises(ValueError, match="shape"):
        make_grid(np.zeros((2, 3, 3)), rows=1)
    with pytest.raises(ValueError, match="rows"):
        make_grid(np.zeros((2, 3, 3, 3)), rows=3)


def test_float_images_are_scaled_and_clipped():
    out = to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0]))
    assert out.tolist() == [0, 0, 128, 255, 255]


def test_save_grid_writes_png_atomically(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    path = save_grid(images, tmp_path / "sub" / "grid.png", rows=2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(path)), make_grid(images, rows=2))
