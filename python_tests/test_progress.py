"""Progress bars: built only when shown (a terminal, enough steps), and never sharing a lock with forked
children: a forked saver killed while drawing its bar must not hang the parent's next save."""
import os
import subprocess
import sys
import textwrap

import pytest

from sparseadapter_kernels import progress as progress_mod
from sparseadapter_kernels.progress import QuietBar, progress


class FakeTerminal:
    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass


def test_no_bar_is_built_off_a_terminal_or_for_few_steps(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert isinstance(progress([1], "one step"), QuietBar)
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    bar = progress(range(100), "not a terminal")
    assert isinstance(bar, QuietBar) and list(bar) == list(range(100))
    bar.update()
    bar.close()


def test_a_shown_bar_has_a_thread_lock_of_its_own(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress(range(3), "shown")
    assert list(bar) == [0, 1, 2] and "shown" in "".join(term.text)
    assert type(bar).get_lock() is progress_mod._bar_class()._lock
    assert type(bar.get_lock()).__module__ in ("_thread", "threading")


FORKED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from sparseadapter_kernels.integration import checkpoint, save_adapters
    from test_checkpoint_atomic import adapted

    class Terminal:
        def isatty(self): return True
        def write(self, s): pass
        def flush(self): pass

    class KillingTerminal(Terminal):  # the child dies while drawing its bar (the bar's lock held)
        def write(self, s): os.kill(os.getpid(), signal.SIGKILL)

    signal.alarm(240)  # a hang (a child blocked on a lock, or the parent) fails instead of blocking the suite
    torch.set_num_threads(1)
    checkpoint.PROGRESS_MIN_MODULES = 1
    sys.stderr = Terminal()
    model = adapted()
    save_adapters(model, {a!r})  # the parent draws bars before it forks
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a child blocked on a lock it inherited held ends too
            sys.stderr = KillingTerminal()
            save_adapters(model, {b!r})
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    save_adapters(model, {a!r})
    print("saved after the killed children")
""")


def test_forked_saver_killed_while_drawing_a_bar_does_not_hang_the_parent(tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("fork: POSIX only")
    script = FORKED.format(tests=os.path.dirname(os.path.abspath(__file__)), a=str(tmp_path / "a"),
                           b=str(tmp_path / "b"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0 and "saved after the killed children" in res.stdout, (res.returncode, res.stderr[-2000:])
