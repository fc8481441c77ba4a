"""The notebook magics in an in-process IPython shell (no kernel): the quick coverage of
``%pagedq`` and ``%%generate``. ``tests/test_jupyter.py`` runs them in a real kernel (slow)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from pagedq import LLM, SamplingParams


@pytest.fixture
def shell(tiny_llama):
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "pagedq")
    sh.run_line_magic(
        "pagedq", f"load {tiny_llama} --dtype float32 --max-num-seqs 8 --no-enable-prefix-caching"
    )
    yield sh
    sh.run_line_magic("pagedq", "unload")


def test_generate_interpolates_and_stores_the_output_like_llm_generate(shell, tiny_llama):
    from pagedq.jupyter_ext.magics import session

    assert session.llm.engine.config.max_num_seqs == 8  # engine flags reach the engine
    assert session.llm.engine.config.enable_prefix_caching is False
    shell.user_ns["name"] = "parser"
    shell.run_cell_magic("generate", "--max-tokens 6 --temperature 0 -o out", "import {name} {unknown}")
    out = shell.user_ns["out"]
    assert out.prompt == "import parser {unknown}"
    assert out.finished
    with LLM(tiny_llama, dtype="float32") as llm:
        ref = llm.generate(out.prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    shell.run_cell_magic("generate", "--max-tokens 4 --temperature 1 --seed 3 --n 3 -o many", "x = 1")
    assert [len(c.token_ids) for c in shell.user_ns["many"].outputs] == [4, 4, 4]
    assert session.llm.stats()["kv_blocks_in_use"] == 0


def test_options_come_from_the_dataclasses_and_bad_ones_name_the_fix(shell):
    from pagedq.jupyter_ext.magics import PagedqMagics

    doc = PagedqMagics.generate.__doc__
    for flag in ("--max-tokens", "--repetition-penalty", "--stop-token-ids", "--background", "{name}"):
        assert flag in doc
    with pytest.raises(UsageError, match="unrecognized arguments: --no-such-flag"):
        shell.run_cell_magic("generate", "--no-such-flag 1", "x")
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        shell.run_cell_magic("generate", "--temperature -1", "x")
    assert "KV cache" in repr(shell.run_line_magic("pagedq", "status"))


def test_kernels_use_the_interpreter_under_test():
    """A kernel started by any test runs this interpreter (the isolated kernelspec of conftest)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable


def test_a_load_that_compiled_the_kernels_says_so_once(shell, tiny_llama, monkeypatch, capsys):
    """The first load on a machine waits for the kernels to compile: the magic says why it took
    longer, once per process (native.build_seconds goes from None to the compile's seconds)."""
    from pagedq.kernels import native

    load = f"load {tiny_llama} --dtype float32"
    monkeypatch.setattr(native, "_build_seconds", None)
    from pagedq.jupyter_ext import magics

    real = magics.session.load

    def load_and_compile(*a, **k):
        monkeypatch.setattr(native, "_build_seconds", 7.5)  # as a cold build during this load sets it
        return real(*a, **k)

    monkeypatch.setattr(magics.session, "load", load_and_compile)
    shell.run_line_magic("pagedq", load)
    assert "the CPU kernels compiled for this machine meanwhile, 7.5 s" in capsys.readouterr().out
    shell.run_line_magic("pagedq", load)  # compiled before this load: nothing to say
    out = capsys.readouterr().out
    assert out.startswith(f"pagedq: loaded {tiny_llama} in "), out
    assert "compiled" not in out, out
