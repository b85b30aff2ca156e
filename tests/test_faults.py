"""Kills and signals in real child processes (docs/reliability.md).

SIGKILL at every point of a checkpoint save, SIGKILL during a training run's save followed by a resume,
SIGTERM during training, SIGINT in-process. Children are forked from the test process (torch already
imported, one thread), so each costs milliseconds instead of an interpreter start. POSIX only.
"""
from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import sys
import time
import traceback

import pytest
import torch
from test_reliability import EVERY_2, assert_same, one_thread, snapshot, straight  # noqa: F401 (fixtures)
from test_train import read_log, tiny

import fewstep.train.loop
from fewstep import checkpoints, files
from fewstep.checkpoints import latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint
from fewstep.objectives.fm import FlowMatching
from fewstep.train import train

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


class Child:
    """``target(send, wait)`` in a forked process; ``send(line)`` reaches :meth:`line`, ``wait()`` blocks
    until :meth:`go`. The child exits 0 when ``target`` returns, 1 on an exception."""

    def __init__(self, target):
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:   # the child: never returns into pytest
            code = 1
            try:
                os.close(up_r)
                os.close(down_w)
                torch.set_num_threads(1)
                target(lambda line: os.write(up_w, (line + "\n").encode()), lambda: os.read(down_r, 1))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(up_w)
        os.close(down_r)
        self.up, self.down, self.buffer = up_r, down_w, b""

    def line(self, timeout: float = 60) -> str | None:
        """The child's next line, or ``None`` if it exited without one."""
        while b"\n" not in self.buffer:
            if not select.select([self.up], [], [], timeout)[0]:
                self.signal(signal.SIGKILL)
                raise TimeoutError("child process hung")
            chunk = os.read(self.up, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def go(self) -> None:
        os.write(self.down, b"g")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.up)
        os.close(self.down)
        return os.waitstatus_to_exitcode(status)


# Every file-system effect of a save, in order: tensor files, fsyncs, the manifest, renames (each file's
# own into the temporary directory, then the directory's), deletions.
HOOKS = [(files, "save_file"), (os, "fsync"), (checkpoints, "write_json"), (os, "replace"), (shutil, "rmtree")]


def pause_at(send, when, armed=lambda: True):
    """(In a child) hook HOOKS so that ``when(n, name)`` ∈ {``before``, ``during``} pauses event ``n``
    forever after telling the parent: ``during`` a tensor-file write half the file is on disk, ``during``
    a deletion one file is gone."""
    counter = itertools.count(1)
    for module, name in HOOKS:
        def hooked(*args, _real=getattr(module, name), _name=name, **kwargs):
            if not armed():
                return _real(*args, **kwargs)
            n = next(counter)
            mode = when(n, _name)
            if mode == "during" and _name == "save_file":
                _real(*args, **kwargs)
                os.truncate(args[1], os.path.getsize(args[1]) // 2)
            elif mode == "during" and _name == "rmtree":
                os.unlink(sorted(p.path for p in os.scandir(args[0]) if p.is_file())[0])
            if mode:
                send(f"{n} {_name} {mode}")
                time.sleep(600)
            return _real(*args, **kwargs)
        setattr(module, name, hooked)


def _state(step):
    return {"w": torch.full((64,), float(step)), "b": torch.arange(8) * step}


def _save(run, step):
    return save_checkpoint(run, step, objective_state=_state(step), optimizer_state=None,
                           rng_states=[{"cpu": torch.arange(3)}], manifest={"nimg": step}, keep=2)


def test_sigkill_at_every_point_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    base = tmp_path / "base"
    _save(base, 1)
    _save(base, 2)
    seen = []
    for k in itertools.count(1):
        run = tmp_path / f"kill{k}"
        shutil.copytree(base, run)
        child = Child(lambda send, wait: (pause_at(send, lambda n, name: n == k and (
            "during" if name in ("save_file", "rmtree") else "before")), _save(run, 3), send("done")))
        message = child.line()
        if message == "done":
            assert child.exit_code() == 0
            break
        child.signal(signal.SIGKILL)
        assert child.exit_code() == -signal.SIGKILL
        seen.append(message)
        # Every checkpoint directory on disk is complete (none half-written, none half-deleted) ...
        for path in list_checkpoints(run):
            verify_checkpoint(path)
        # ... and the newest is the new one once renamed into place, else the previous one, intact.
        newest = latest_checkpoint(run)
        assert newest.step == (3 if (run / "checkpoint-00000003").exists() else 2), message
        assert all(torch.equal(v, _state(newest.step)[k]) for k, v in newest.tensors("objective.safetensors").items())
        # The next save cleans up what the killed one left and works.
        _save(run, 4)
        assert latest_checkpoint(run).step == 4
        assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp", ".trash"))]
    names = [m.split()[1] for m in seen]
    assert len(seen) >= 10 and set(names) == {"save_file", "fsync", "write_json", "replace", "rmtree"}, seen
    assert names.index("rmtree") > names.index("replace")   # killed both before and after the rename


@pytest.mark.parametrize("point", [("save_file", 1, "during"), ("write_json", 1, "before"), ("replace", 5, "before"),
                                   ("fsync", 6, "before")],
                         ids=["objective-half-written", "manifest", "before-rename", "after-rename"])
def test_sigkill_during_a_training_save_then_resume_is_exact(fashion_dir, tmp_path, straight, point):  # noqa: F811
    run, (target, occurrence, mode) = tmp_path / "run", point
    cfg = tiny(fashion_dir, **EVERY_2)

    def child(send, wait):
        state = {"armed": False, "seen": {}}
        real = fewstep.train.checkpointer.save_checkpoint

        def save(run_dir, step, **kw):
            state["armed"] = step == 4
            return real(run_dir, step, **kw)

        def when(n, name):
            state["seen"][name] = state["seen"].get(name, 0) + 1
            return mode if (name, state["seen"][name]) == (target, occurrence) else None

        fewstep.train.checkpointer.save_checkpoint = save
        pause_at(send, when, armed=lambda: state["armed"])
        train(cfg, run, show_progress=False)
        send("done")

    proc = Child(child)
    message = proc.line()
    assert message is not None and message.split()[1] == target, message
    proc.signal(signal.SIGKILL)
    assert proc.exit_code() == -signal.SIGKILL
    assert latest_checkpoint(run).step == (4 if point[0] == "fsync" else 2)
    result = train(cfg, run, show_progress=False)     # rerun the same command: it resumes and replays exactly
    assert result.step == 8
    assert_same(snapshot(result.checkpoint), straight[8])


def test_sigterm_stops_after_the_current_step_with_a_checkpoint(fashion_dir, tmp_path, straight):  # noqa: F811
    run = tmp_path / "run"
    cfg = tiny(fashion_dir)

    def child(send, wait):
        original, calls = FlowMatching.forward, itertools.count(1)

        def forward(self, *args, **kwargs):
            if next(calls) == 3:   # step 3 is under way when the signal arrives
                send("ready")
                wait()
            return original(self, *args, **kwargs)

        FlowMatching.forward = forward
        result = train(cfg, run, show_progress=False)
        send(json.dumps({"step": result.step, "stopped": result.stopped, "checkpoint": result.checkpoint.name}))

    proc = Child(child)
    assert proc.line() == "ready"
    proc.signal(signal.SIGTERM)
    proc.go()
    report = json.loads(proc.line())
    assert proc.exit_code() == 0
    assert report == {"step": 3, "stopped": "SIGTERM", "checkpoint": "checkpoint-00000003"}
    assert read_log(run)[-1] == {"event": "stopped", "signal": "SIGTERM", "step": 3, "kimg": 0.048,
                                 "resume": f"train() with run directory {run}"}
    result = train(cfg, run, show_progress=False)
    assert result.step == 8 and result.stopped is None
    assert_same(snapshot(result.checkpoint), straight[8])


def test_sigint_stops_in_process_and_restores_the_handlers(fashion_dir, tmp_path, monkeypatch, capsys, straight):  # noqa: F811
    original, calls = FlowMatching.forward, itertools.count(1)

    def forward(self, *args, **kwargs):
        if next(calls) == 5:
            signal.raise_signal(signal.SIGINT)   # Ctrl-C during step 5
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatching, "forward", forward)
    result = train(tiny(fashion_dir), tmp_path / "run", show_progress=False)
    assert result.stopped == "SIGINT" and result.step == 5 and result.checkpoint.name == "checkpoint-00000005"
    assert "received SIGINT: stopped after step 5 (0.080 kimg) with checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    assert_same(snapshot(train(tiny(fashion_dir), tmp_path / "run", show_progress=False).checkpoint), straight[8])
