import subprocess
import sys

import pytest
from PIL import Image

from diffattn import Dense, Neighborhood, Radial, VideoGrid
from diffattn.errors import UserError
from diffattn.patterns.__main__ import main
from diffattn.patterns.picture import layout_image, save_layout_png, tile_fill


def test_tile_fill_matches_the_token_mask():
    grid = VideoGrid(3, 5, 7, text_tokens=5)
    layout = Neighborhood(kernel_size=(2, 3, 3)).layout(grid, block_size=32)
    mask = layout.token_mask().double()
    n, b = grid.num_tokens, 32
    fill = tile_fill(layout)
    for qb in range(fill.shape[0]):
        for kb in range(fill.shape[1]):
            tile = mask[qb * b : min(n, (qb + 1) * b), kb * b : min(n, (kb + 1) * b)]
            assert fill[qb, kb].item() == pytest.approx(tile.mean().item())


def test_picture_is_white_where_tiles_are_skipped_and_dark_where_full():
    grid = VideoGrid(8, 8, 16)
    layout = Radial(block_size=64).layout(grid, block_size=64)
    image = layout_image(layout, max_pixels=1024)
    scale = image.shape[0] // layout.num_q_blocks
    blocks = image[::scale, ::scale]
    visited = tile_fill(layout).numpy() > 0
    assert (blocks[~visited] == 255).all()
    assert (blocks[visited].max(-1) < 128).all()


def test_large_layouts_are_pooled_to_max_pixels():
    grid = VideoGrid(21, 30, 52)
    image = layout_image(Dense().layout(grid, block_size=32), max_pixels=200)
    assert max(image.shape[:2]) <= 256 and image.shape[0] >= 100


def test_save_png_writes_a_png_and_refuses_other_suffixes(tmp_path):
    layout = Dense().layout(VideoGrid(2, 4, 4), block_size=32)
    path = save_layout_png(layout, tmp_path / "sub" / "dense.png")
    assert Image.open(path).format == "PNG"
    with pytest.raises(UserError, match=r"\.png"):
        save_layout_png(layout, tmp_path / "dense.jpg")
    assert [p.name for p in (tmp_path).iterdir()] == ["sub"]  # no stray temp file


def test_command_prints_density_and_writes_picture(tmp_path, capsys):
    out = tmp_path / "gna.png"
    code = main(["neighborhood", "--frames", "4", "--height", "8", "--width", "16", "--kernel-size", "3,5,5",
                 "--tile-shape", "1,4,8", "--block-size", "32", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    expected = Neighborhood(kernel_size=(3, 5, 5)).layout(VideoGrid(4, 8, 16), 32, tile_shape=(1, 4, 8)).density
    assert f"density      {expected:.4f}" in text
    layout = Neighborhood(kernel_size=(3, 5, 5)).layout(VideoGrid(4, 8, 16), 32, tile_shape=(1, 4, 8))
    assert f"({layout.nbytes} bytes" in text and f"masks        {layout.num_masks} distinct" in text


def test_command_bad_input_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diffattn.patterns", "neighborhood", "--frames", "2", "--kernel-size", "3,3,3",
         "--strict", "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "kernel_size*dilation on axis t" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()
    bad_flag = subprocess.run([sys.executable, "-m", "diffattn.patterns", "radial", "--block-size", "100"],
                              capture_output=True, text=True)
    assert bad_flag.returncode == 2 and "block_size" in bad_flag.stderr
