"""The CLI as people use it: --version, --lr/--seed, hints for flags that are config keys, help text,
``list metrics`` and error messages that keep their bracketed text."""
from __future__ import annotations

import json
import sys

from typer.testing import CliRunner

from fewstep import __version__
from fewstep.cli import app
from fewstep.clihelp import reflow

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def flat(text: str) -> str:
    """Output with the box drawing and line wrapping of rich panels removed."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def test_version():
    res = run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"fewstep {__version__}"


def test_lr_and_seed_flags_set_the_config():
    res = run("train", "--recipe", "smoke", "--lr", "3e-4", "--seed", "7", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["train"]["lr"] == 3e-4 and cfg["train"]["seed"] == 7


def test_unknown_flag_that_is_a_config_field_names_the_set_key():
    res = run("train", "--grad-clip", "1")
    assert res.exit_code == 2
    assert "did you mean --set train.grad_clip=VALUE?" in flat(res.output)
    res = run("train", "--warmup", "1")
    assert "--set train.lr_warmup_kimg=VALUE" in flat(res.output)
    res = run("train", "--seeds", "1")          # close to a real flag: typer's own suggestion stays
    assert "--seed" in flat(res.output) and "--set train" not in flat(res.output)


def test_help_shows_flags_as_flags_and_whole_sentences():
    res = run("train", "--help", env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "<bool>" not in res.output
    line = next(x for x in res.output.splitlines() if "--dry-run" in x)
    assert "Check everything that can be checked without training" in line
    # A docstring's source line breaks are not help line breaks: at 200 columns the paragraph is one line.
    res = run("compare", "--help", env={"COLUMNS": "400"})
    assert "differ (separating those that change only how a run executes" in res.output
    assert reflow("one\n    two\n\n    three") == "one two\n\nthree"


def test_list_metrics_shows_what_sweep_accepts():
    res = run("list", "metrics", env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for name in ("auto", "sliced-wasserstein", "fmnist-classifier", "inception", "random-projection"):
        assert name in res.output


def test_error_messages_keep_bracketed_text(tmp_path, monkeypatch):
    """Rich markup swallowed `[hf]` in `pip install 'fewstep[hf]'` (issue 22)."""
    monkeypatch.setitem(sys.modules, "datasets", None)    # the hf extra is not installed
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    res = run("train", "--recipe", "smoke", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", tmp_path / "r",
              "--no-progress")
    assert res.exit_code == 2
    assert "pip install 'fewstep[hf]'" in flat(res.output)


def test_logging_levels_and_rank_zero_only(capsys, monkeypatch):
    import logging

    from fewstep.logs import setup_logging

    log = logging.getLogger("fewstep.sweep.run")
    try:
        setup_logging(logging.INFO)
        log.info("an [info] line")
        log.warning("a warning")
        err = capsys.readouterr().err
        assert "an [info] line" in err and "warning: a warning" in err     # markup off: brackets stay
        setup_logging(logging.WARNING)                                     # --quiet
        log.info("hidden")
        log.warning("shown")
        err = capsys.readouterr().err
        assert "hidden" not in err and "shown" in err
        monkeypatch.setenv("RANK", "1")                                    # another rank prints nothing
        log.warning("rank one")
        assert "rank one" not in capsys.readouterr().err
    finally:
        logger = logging.getLogger("fewstep")
        for h in [h for h in logger.handlers if getattr(h, "_fewstep", False)]:
            logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
