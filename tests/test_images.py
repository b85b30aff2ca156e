"""PNG grids: exact round trip and layout."""
from __future__ import annotations

import pytest
import torch

from fewstep.images import make_grid, read_png, to_uint8, write_png


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_exact(tmp_path, channels):
    img = torch.randint(0, 256, (channels, 13, 7), dtype=torch.uint8)
    path = write_png(tmp_path / "a.png", img)
    assert torch.equal(read_png(path), img)


def test_grid_layout_and_values():
    a = to_uint8(torch.full((4, 1, 3, 3), -1.0))   # black
    b = to_uint8(torch.full((4, 1, 3, 3), 1.0))    # white
    grid = make_grid([a, b], ncol=2, pad=1)
    # each block: 2 rows × 2 cols of 3×3 with 1-px padding → 9 × 9; blocks separated by a 2-px grey gap
    assert grid.shape == (1, 9 + 2 + 9, 9)
    assert int(grid[0, 0, 0]) == 255 and int(grid[0, 1, 1]) == 0      # padding, first black image
    assert int(grid[0, 9, 0]) == 128 and int(grid[0, 12, 1]) == 255   # gap, first white image


def test_write_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"needs \(1\|3, H, W\) uint8"):
        write_png(tmp_path / "x.png", torch.zeros(2, 4, 4, dtype=torch.uint8))
