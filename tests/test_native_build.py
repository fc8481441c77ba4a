"""How the native CPU kernels are built: in parallel, in the background, and failing softly.

Each test builds in a fresh interpreter with its own ``PAGEDQ_CACHE`` and a stand-in compiler
(``CC``, a shell script), so the real library of the test session is never touched and no test
waits for a real compile."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from pagedq.kernels import native

# The stand-in compiler: the arguments of a compile (-c SRC -o OBJ) or of the link (... -o OUT).
# MODE decides what it does; every call appends a line to $CC_LOG.
FAKE_CC = r"""#!/bin/sh
out=""; compile=0; prev=""; src=""
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  [ "$prev" = "-c" ] && src="$a"
  [ "$a" = "-c" ] && compile=1
  prev="$a"
done
if [ $compile = 1 ]; then
  echo "compile $(basename "$src")" >> "$CC_LOG"
  case "$MODE" in
    compile-error)
      case "$src" in *gemv_cpu.c) echo "gemv_cpu.c:1: error: stand-in failure" >&2; exit 1;; esac;;
    together)
      # wait (at most ~20 s) until a second compile has started: only a parallel build gets there
      touch "$GATE.$$"
      i=0; while [ "$(ls "$GATE".* 2>/dev/null | wc -l)" -lt 2 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
      [ $i -lt 200 ] || { echo "no other compile ran alongside $(basename "$src")" >&2; exit 1; };;
    gated)
      i=0; while [ ! -e "$GATE" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done;;
  esac
  touch "$out"; exit 0
fi
echo "link" >> "$CC_LOG"
rm -f "$out"   # as a failed link leaves no output behind
echo "ld: stand-in link failure" >&2
exit 1
"""


def _build_in_child(tmp_path, mode: str, code: str) -> subprocess.CompletedProcess:
    cc = tmp_path / "cc"
    cc.write_text(FAKE_CC)
    cc.chmod(0o755)
    env = dict(
        os.environ,
        CC=str(cc),
        MODE=mode,
        CC_LOG=str(tmp_path / "cc.log"),
        GATE=str(tmp_path / "gate"),
        PAGEDQ_CACHE=str(tmp_path / "cache"),
        PAGEDQ_CPU_KERNELS="native",
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )


def _log(tmp_path) -> list[str]:
    return (tmp_path / "cc.log").read_text().splitlines()


LIBRARY = """
from pagedq.kernels import native
print("library", native.library())
"""


def test_a_compile_error_leaves_the_torch_path_with_the_compilers_message(tmp_path):
    out = _build_in_child(tmp_path, "compile-error", LIBRARY)
    assert out.returncode == 0, out.stderr
    assert "library None" in out.stdout
    assert "building the native CPU kernels failed, using the torch path" in out.stderr
    assert "gemv_cpu.c:1: error: stand-in failure" in out.stderr
    log = _log(tmp_path)
    assert sorted(line for line in log if line.startswith("compile")) == sorted(
        f"compile {os.path.basename(s)}" for s in native._SRCS
    )
    assert "link" not in log  # nothing is linked from a failed compile
    assert not [f for f in os.listdir(tmp_path / "cache" / "native") if f.endswith(".so")]


def test_a_failed_link_leaves_the_torch_path_too(tmp_path):
    """A failed link removes its output; the build used to crash on removing it again."""
    out = _build_in_child(tmp_path, "link-error", LIBRARY)
    assert out.returncode == 0, out.stderr
    assert "library None" in out.stdout
    assert "ld: stand-in link failure" in out.stderr
    assert _log(tmp_path)[-1] == "link"


@pytest.mark.skipif(native._cores() < 2, reason="one core: the sources compile one at a time")
def test_the_sources_compile_in_parallel(tmp_path):
    """Each stand-in compile waits for a second one to start: a build that compiled the files
    one after another would fail its first compile."""
    out = _build_in_child(tmp_path, "together", LIBRARY)
    assert out.returncode == 0, out.stderr
    assert "no other compile ran alongside" not in out.stderr, out.stderr
    assert "ld: stand-in link failure" in out.stderr  # every compile passed: the link was reached
    assert len([line for line in _log(tmp_path) if line.startswith("compile")]) == len(native._SRCS)


def test_start_build_returns_at_once_and_library_waits_for_that_build(tmp_path):
    """The engine starts the build before the weights load; the first library() call waits for
    that build instead of starting another (one failure message, one set of compiles)."""
    code = """
    import os, time
    from pagedq.kernels import native
    native.start_build()
    while not native._lock.locked():  # the thread has begun the build (its compiles wait)
        time.sleep(0.01)
    native.start_build()  # a second call starts nothing, and does not wait for the build
    builder = native._builder
    print("alive", builder.is_alive(), builder.name)
    open(os.environ["GATE"], "w").close()  # the compiles may finish now
    print("library", native.library())
    print("alive", builder.is_alive())
    """
    out = _build_in_child(tmp_path, "gated", code)
    assert out.returncode == 0, out.stderr
    assert "alive True pagedq-native-build" in out.stdout
    assert "library None" in out.stdout
    assert "alive False" in out.stdout
    assert out.stderr.count("building the native CPU kernels failed") == 1, out.stderr
    assert len([line for line in _log(tmp_path) if line.startswith("compile")]) == len(native._SRCS)


def test_start_build_does_nothing_where_the_kernels_are_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDQ_CPU_KERNELS", "torch")
    monkeypatch.setattr(native, "_builder", None)
    native.start_build()
    assert native._builder is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_during_the_background_build_builds_on_its_own(tmp_path):
    """The child of a fork taken while the build thread holds the lock must not wait forever
    for a thread it does not have."""
    code = """
    import os, sys, time
    from pagedq.kernels import native
    native.start_build()
    while not native._lock.locked():  # the thread holds the lock now: its compiles wait for the gate
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:
        open(os.environ["GATE"], "w").close()
        print("child library", native.library(), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status))
    print("parent library", native.library())
    """
    out = _build_in_child(tmp_path, "gated", code)
    assert out.returncode == 0, out.stderr
    assert "child library None" in out.stdout, out.stdout + out.stderr
    assert "child exit 0" in out.stdout
    assert "parent library None" in out.stdout
