"""Figures with matplotlib: charts written and readable, labelled grids keep exact pixels, and without
matplotlib a message naming the extra (charts) or an unlabelled grid with a warning (sample grids)."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from imagefiles import find_block, read_rgb

from fewstep.images import make_grid, read_png
from fewstep.plots import (Panel, PlotsUnavailable, Series, labelled_grid_png, line_chart, panel_chart, step_label,
                           write_grid)


def test_line_and_panel_charts_are_written(tmp_path):
    series = [Series("tvm", [1, 2, 4], [30.0, 20.0, 15.0]), Series("fm", [1, 2, 4], [150.0, float("nan"), 25.0])]
    path = line_chart(tmp_path / "c.png", series, title="FD vs NFE", xlabel="NFE", ylabel="FD", log_x=True,
                      x_ticks=[1, 2, 4], size=(500, 300))
    png = read_rgb(path)
    assert png.shape == (300, 500, 3)
    colours = {tuple(c) for c in png.reshape(-1, 3)[::7]}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours          # both lines, matplotlib's C0 and C1
    path = panel_chart(tmp_path / "p.png", [Panel("a: loss", "loss", [series[0]]), Panel("b: loss", "loss", [series[1]])],
                       xlabel="kimg", panel_size=(300, 200))
    assert read_rgb(path).shape == (200, 600, 3)
    assert not list(tmp_path.glob(".*"))                                      # no temporary files left


def test_labelled_grid_keeps_every_pixel(tmp_path):
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 256, (5, 3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(3)]
    layout = labelled_grid_png(tmp_path / "g.png", blocks, [step_label(n) for n in (1, 2, 4)], title="seeds 0–4")
    grid = make_grid(blocks).permute(1, 2, 0).numpy()
    assert find_block(read_rgb(tmp_path / "g.png"), grid) == [(layout.top, layout.left)]
    assert [step_label(n) for n in (1, 4)] == ["1 step", "4 steps"]
    with pytest.raises(ValueError, match="2 labels for 3 grid blocks"):
        labelled_grid_png(tmp_path / "x.png", blocks, ["a", "b"])


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("fewstep.plots._warned_unlabelled", False)


def test_without_matplotlib_charts_name_the_extra_and_grids_stay_unlabelled(tmp_path, no_matplotlib, caplog):
    with pytest.raises(PlotsUnavailable, match=r"pip install 'fewstep\[plots\]'"):
        line_chart(tmp_path / "c.png", [Series("a", [1], [1.0])])
    blocks = [torch.full((4, 1, 8, 8), 7, dtype=torch.uint8)]
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        write_grid(tmp_path / "g.png", blocks, ["1 step"])
        write_grid(tmp_path / "g2.png", blocks, ["1 step"])
    assert torch.equal(read_png(tmp_path / "g.png"), make_grid(blocks))       # the bare grid, as before
    warnings = [r.getMessage() for r in caplog.records if "without labels" in r.getMessage()]
    assert len(warnings) == 1 and "fewstep[plots]" in warnings[0]             # said once per process


def test_compare_plot_without_matplotlib_fails_with_the_extra(tmp_path, no_matplotlib):
    from typer.testing import CliRunner

    from fewstep.cli import app

    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text('{"config": {}, "data_spec": {}}')
        (run / "log.jsonl").write_text("\n".join(f'{{"step": {i}, "kimg": {i}, "loss": {1 / i}}}'
                                                 for i in range(1, 4)))
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "c.png")])
    assert res.exit_code == 2
    assert "pip install 'fewstep[plots]'" in " ".join(res.output.replace("│", " ").split())
