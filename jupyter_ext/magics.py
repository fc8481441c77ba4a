"""``%load_ext pagedq``: the ``%pagedq`` line magic and the ``%%generate`` cell magic.

One engine per kernel, held by :data:`session`; a background :class:`EngineDriver` thread steps
it, so foreground cells, ``--background`` generations and widgets share one continuous batch.
``%pagedq unload`` closes the engine, joins the thread and hands freed memory back to the
operating system, so that a new ``load`` works at once in the same kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import html
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import display

from pagedq.driver import EngineDriver, Generation
from pagedq.options import add_arguments, collect
from pagedq.outputs import GenerationError
from pagedq.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine (torch) loads with the first model, not with %load_ext
    from pagedq.llm import LLM

UPDATE_INTERVAL = 0.05  # seconds between display updates while tokens stream


@dataclass
class Session:
    llm: LLM | None = None
    driver: EngineDriver | None = None
    model: str | None = None
    options: dict = field(default_factory=dict)
    loaded_at: float = 0.0
    shared: object | None = None  # pagedq.connect()'s handle, made on the first --shared cell

    def connect_shared(self):
        if self.shared is None:
            from pagedq.serve.client import connect

            self.shared = connect()
        return self.shared

    def require(self):
        if self.llm is None:
            raise ValueError(
                "no model is loaded; run %pagedq load MODEL first (e.g. %pagedq load pagedq-tiny)"
            )
        return self.llm, self.driver

    def load(self, model: str, **options):
        from pagedq.llm import LLM

        self.unload()
        self.llm = LLM(model, **options)
        self.driver = self.llm.start_driver()
        self.model, self.options, self.loaded_at = model, options, time.perf_counter()
        return self.llm

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()  # stops its driver too
        self.llm = self.driver = None
        self.model = None
        release_memory()


session = Session()


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def driver_for(llm=None) -> EngineDriver:
    """The session's driver, or one for ``llm`` (kept on it, so every widget shares it)."""
    if llm is None or llm is session.llm:
        return session.require()[1]
    return llm.start_driver()  # the same driver on every call, so every widget shares it


# --- rendering ------------------------------------------------------------------------------


class Rendered:
    """What a ``%%generate`` cell shows: the prompt's completions (side by side when n > 1)."""

    def __init__(self, texts: list[str], fmt: str = "text", footer: str = ""):
        self.texts, self.fmt, self.footer = texts, fmt, footer

    def _repr_mimebundle_(self, include=None, exclude=None):
        if len(self.texts) == 1:
            plain = self.texts[0]
        else:
            plain = "\n\n".join(f"--- sample {i} ---\n{t}" for i, t in enumerate(self.texts))
        if self.footer:
            plain += f"\n\n[{self.footer}]"
        bundle = {"text/plain": plain}
        if len(self.texts) > 1:
            cols = "".join(
                f"<td style='vertical-align:top;padding:4px 8px'><b>sample {i}</b>"
                f"<pre style='white-space:pre-wrap'>{html.escape(t)}</pre></td>"
                for i, t in enumerate(self.texts)
            )
            bundle["text/html"] = f"<table><tr>{cols}</tr></table>" + self._html_footer()
        elif self.fmt == "markdown":
            bundle["text/markdown"] = self.texts[0] + (f"\n\n*{self.footer}*" if self.footer else "")
        elif self.fmt == "code":
            bundle["text/markdown"] = f"```python\n{self.texts[0]}\n```" + (
                f"\n\n*{self.footer}*" if self.footer else ""
            )
        return bundle

    def _html_footer(self) -> str:
        return (
            f"<div style='color:#777;font-size:smaller'>{html.escape(self.footer)}</div>"
            if self.footer
            else ""
        )


def interpolate(text: str, namespace: dict) -> str:
    """Replace ``{name}`` with the value of notebook variable ``name``; unknown names stay as they are."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        return str(namespace[name]) if name in namespace else m.group(0)

    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, text)


class Status:
    def __init__(self, rows: list[tuple[str, str]]):
        self.rows = rows

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td style='text-align:left'><b>{k}</b></td><td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self.rows
        )
        return f"<table>{body}</table>"

    def __repr__(self) -> str:
        width = max(len(k) for k, _ in self.rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows)


def _quantization_name(eng) -> str:
    if eng.config.quantization:
        return f"{eng.config.quantization} (on load)"
    raw = eng.model_config.raw.get("quantization_config")
    return (
        f"{raw.get('quant_method')} {raw.get('bits', '')}-bit checkpoint".replace(" -bit", "")
        if raw
        else "none"
    )


def status() -> Status:
    if session.llm is None:
        return Status([("model", "none loaded (%pagedq load MODEL)")])
    s = session.llm.stats()
    eng = session.llm.engine
    up = time.perf_counter() - session.loaded_at
    free = s["num_kv_blocks"] - s["kv_blocks_in_use"]
    return Status(
        [
            ("model", f"{session.model} ({eng.model_config.architecture})"),
            ("dtype", f"{eng.dtype}".replace("torch.", "")),
            ("quantization", _quantization_name(eng)),
            ("KV cache", f"{s['kv_blocks_in_use']} of {s['num_kv_blocks']} blocks used, {free} free "
             f"({s['block_size']} tokens each, {eng.config.kv_cache_dtype})"),
            ("KV waste", f"{100 * s['kv_waste']:.1f}% now, {100 * s['peak_kv_waste']:.1f}% at peak"),
            ("prefix cache", f"{s['prefix_cache_hits']} of {s['prefix_cache_queries']} prompt tokens hit"),
            ("queue", f"{s['num_running']} running, {s['num_waiting']} waiting"),
            ("tokens", f"{s['generated_tokens']} generated, {s['generated_tokens'] / max(up, 1e-9):.1f} tok/s since load"),
            ("weights", f"{s['weight_bytes'] / 2**20:.1f} MiB"),
        ]
    )  # fmt: skip


# --- the magics ---------------------------------------------------------------------------------


@magics_class
class PagedqMagics(Magics):
    @line_magic
    def pagedq(self, line: str):
        """%pagedq load MODEL [engine options]   e.g. --dtype bfloat16 --quantization int8 --kv-cache-memory 1GiB
        %pagedq load --help  every engine option (the fields of pagedq.EngineConfig)
        %pagedq status      the engine at a glance
        %pagedq unload      free the weights and the KV cache (a new load works at once)
        """
        words = shlex.split(line)
        if not words or words[0] not in ("load", "status", "unload"):
            print(self.pagedq.__doc__)
            return None
        cmd = words[0]
        if cmd == "status":
            return status()
        if cmd == "unload":
            session.unload()
            print("pagedq: unloaded")
            return None
        try:
            a = _LOAD_PARSER.parse_args(words[1:])
        except _Usage as e:
            print(e)
            return None
        opts = collect(a, _LOAD_PARSER.fields, drop_none=True)
        from pagedq.kernels import native

        t0 = time.perf_counter()
        compiled_before = native.build_seconds()
        session.load(a.model, **opts)
        took = f"pagedq: loaded {a.model} in {time.perf_counter() - t0:.1f} s"
        compiled = native.build_seconds()
        if compiled is not None and compiled_before is None:
            took += f" (the CPU kernels compiled for this machine meanwhile, {compiled:.1f} s: once, later loads reuse them)"
        print(took)
        return None

    @cell_magic
    def generate(self, line: str, cell: str):
        """Generate a completion of the cell's text with the loaded model, streaming into the cell.

        ``{name}`` in the cell is replaced by the notebook variable ``name`` (unknown names stay
        as written). Interrupting the kernel aborts the request and frees its KV blocks.
        """
        try:
            args = _GENERATE_PARSER.parse_args(shlex.split(line))
        except _Usage as e:
            raise UsageError(str(e)) from None
        ns: dict = self.shell.user_ns if self.shell is not None else {}
        gen = _submit(args, interpolate(cell.rstrip("\n"), ns))
        handle = display(Rendered([""] * args.n, args.format), display_id=True)
        updater = _Updater(handle, args.format, gen)
        if args.background:
            if args.output:

                def keep(out, name=args.output):
                    if out.finished:
                        ns[name] = out

                gen.on_output(keep)
            gen.on_output(updater)
            return gen
        try:
            for out in gen.outputs():
                updater(out)
        except KeyboardInterrupt:
            gen.cancel()
            updater.final(gen.latest, note="interrupted: request aborted, its KV blocks freed")
            return None
        except GenerationError as e:  # the text so far stays on screen, marked as cut off
            updater.final(gen.latest, note=f"FAILED, the text is cut off: {e}")
            raise
        if args.output:
            ns[args.output] = gen.latest
        return None


def _submit(args, text: str) -> Generation:
    """Start a ``%%generate`` cell's request on the kernel's engine or, with ``--shared``, the
    server's."""
    messages = None
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}
        ]
    params = SamplingParams(**collect(args, _GENERATE_PARSER.fields))
    if args.shared:  # the same display and interrupt handling over the server's engine
        shared = session.connect_shared()
        return shared.submit(params=params, messages=messages) if messages else shared.submit(text, params)
    llm, driver = session.require()
    prompt: object = text
    if messages is not None:
        from pagedq.llm import chat_prompt

        prompt = {"prompt": text, **chat_prompt(llm.get_tokenizer(), messages)}
    return driver.submit(prompt, params)


class _Updater:
    """Throttled display updates: at most one per ``UPDATE_INTERVAL``, and always the last."""

    def __init__(self, handle, fmt: str, gen: Generation):
        self.handle, self.fmt, self.gen = handle, fmt, gen
        self.last = 0.0

    def __call__(self, out) -> None:
        now = time.perf_counter()
        if out.finished:
            self.final(out)
        elif now - self.last >= UPDATE_INTERVAL:
            self.last = now
            self.handle.update(Rendered([c.text for c in out.outputs], self.fmt))

    def final(self, out, note: str = "") -> None:
        if out is None:
            return
        n = sum(len(c.token_ids) for c in out.outputs)
        reasons = ", ".join(sorted({str(c.finish_reason) for c in out.outputs}))
        footer = f"{n} tokens, {self.gen.tokens_per_second:.1f} tok/s, finish: {reasons}"
        if note:
            footer = f"{note}; {footer}"
        self.handle.update(Rendered([c.text for c in out.outputs], self.fmt, footer))


class _Usage(Exception):
    """A magic's options did not parse (argparse would exit the kernel's process)."""


class _MagicParser(argparse.ArgumentParser):
    fields: dict[str, str] = {}  # noqa: RUF012 - set per parser: dataclass field -> dest

    def error(self, message: str):
        raise _Usage(f"{self.format_usage()}{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None):
        raise _Usage(message or self.format_help())


def _load_parser() -> _MagicParser:
    from pagedq.config import EngineConfig

    p = _MagicParser(prog="%pagedq load")
    p.add_argument("model", help="model folder, or pagedq-tiny (the bundled model)")
    p.fields = add_arguments(p, EngineConfig, exclude=("model",))
    return p


def _generate_parser() -> _MagicParser:
    p = _MagicParser(prog="%%generate", add_help=False)
    p.fields = add_arguments(
        p,
        SamplingParams,
        exclude=("logit_bias", "prompt_logprobs"),
        defaults={"max_tokens": 128, "temperature": 0.7},
    )
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("-o", "--output", default=None, help="store the RequestOutput in this variable")
    p.add_argument("--format", default="text", choices=["text", "markdown", "code"])
    p.add_argument("--background", action="store_true", help="return a Generation handle at once")
    p.add_argument(
        "--shared", action="store_true", help="run on the Jupyter server's shared engine (pagedq.connect())"
    )
    return p


_LOAD_PARSER = _load_parser()
_GENERATE_PARSER = _generate_parser()
# ``%%generate?`` shows the options under the docstring
PagedqMagics.generate.__doc__ = f"{PagedqMagics.generate.__doc__}\n{_GENERATE_PARSER.format_help()}"


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(PagedqMagics)


def unload_ipython_extension(ipython) -> None:
    session.unload()
