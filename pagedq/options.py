"""Options derived from the dataclasses that define them.

Each engine option is a field of :class:`~pagedq.config.EngineConfig` and each sampling option
a field of :class:`~pagedq.sampling_params.SamplingParams` (beam search: of
:class:`~pagedq.beam_search.BeamSearchParams`): name, type, default and help are written there
once. The ``pagedq`` command line, ``%pagedq load`` and ``%%generate`` build their flags here;
the HTTP schema (:mod:`pagedq.serve.protocol`) and ``pagedq.connect()`` read the same fields
through :func:`wire_fields`. A face may change a default (the CLI generates greedily by
default) or rename a flag that would clash (``--sampling-seed``), never redefine an option.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Iterable

# SamplingParams fields that the OpenAI API spells or shapes per endpoint (max_tokens defaults,
# logprobs as a flag in chat, logit_bias keys as strings, stop as a string or list): the
# request schemas handle these; every other sampling field travels under its own name.
API_SHAPED = ("max_tokens", "logprobs", "prompt_logprobs", "logit_bias", "stop")


@functools.cache
def wire_fields() -> tuple[str, ...]:
    """The SamplingParams fields that go over HTTP as themselves (see :data:`API_SHAPED`)."""
    from .sampling_params import SamplingParams

    return tuple(f.name for f in _fields(SamplingParams) if f.name not in API_SHAPED)


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _flag_type(hint, f: dataclasses.Field) -> tuple[type, bool] | None:
    """(argparse type, repeatable) of a field: its metadata's ``type``, else the item type of a
    ``list[...]`` in its annotation (a repeatable flag: ``stop: str | list[str]``), else the first
    of int / float / str / bool; None when it has no command-line form (a dict)."""
    if "type" in f.metadata:
        return f.metadata["type"], False
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for a in args:
        if typing.get_origin(a) is list:
            return typing.get_args(a)[0], True
    scalar = next((a for a in args if a in (bool, int, float, str)), None)
    return None if scalar is None else (scalar, False)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict | None = None,
    rename: dict[str, str] | None = None,
    dest_prefix: str = "",
) -> dict[str, str]:
    """Add a ``--flag`` for each field of the dataclass ``cls`` (``only`` those, minus
    ``exclude``); returns field name -> argparse dest for :func:`collect`. ``defaults``
    overrides defaults for this face; ``rename`` maps a field to another flag name (without
    dashes); ``dest_prefix`` keeps two dataclasses' fields of one name apart (``seed``)."""
    defaults, rename = defaults or {}, rename or {}
    wanted = None if only is None else set(only)
    # annotations are strings (``from __future__ import annotations``); torch's types need no torch
    hints = typing.get_type_hints(cls, localns={"torch": types.SimpleNamespace(dtype=str, device=str)})
    added: dict[str, str] = {}
    for f in _fields(cls):
        if f.name in exclude or (wanted is not None and f.name not in wanted):
            continue
        flag_type = _flag_type(hints[f.name], f)
        if flag_type is None:
            continue
        typ, repeatable = flag_type
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        default = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        kw: dict = {"dest": dest_prefix + f.name, "default": default, "help": f.metadata.get("help")}
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif repeatable:
            kw.update(action="append", type=typ, metavar=f.name.upper())
        else:
            kw.update(type=typ, metavar=f.name.upper())
        if kw["help"] and default is not None and default is not False and default != "":
            kw["help"] += f" (default: {default})"
        parser.add_argument(flag, **kw)
        added[f.name] = dest_prefix + f.name
    return added


def collect(args: argparse.Namespace, dests: dict[str, str], *, drop_none: bool = False) -> dict:
    """The parsed values of the fields :func:`add_arguments` added, as keyword arguments of the
    dataclass (those left at None dropped on request)."""
    out = {name: getattr(args, dest) for name, dest in dests.items()}
    return {k: v for k, v in out.items() if v is not None} if drop_none else out
