"""Each engine option and sampling field is defined once — a field of ``EngineConfig`` or
``SamplingParams`` — and every face derives its flags from there (``pagedq.options``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os

import pytest

from pagedq.config import EngineConfig
from pagedq.options import add_arguments, collect, wire_fields
from pagedq.sampling_params import BeamSearchParams, SamplingParams

from .test_layers import MODULES

# ``model`` is each command's subject (a positional folder, or a benchmark model's name), not a flag
OPTIONS = ({f.name for f in dataclasses.fields(EngineConfig)} - {"model"}) | {
    f.name for f in dataclasses.fields(SamplingParams) if f.init
}


def _literal_flags(path: str) -> list[tuple[int, str]]:
    """``--flag`` strings given literally to ``add_argument`` / traitlets named like options."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and arg.value.startswith("--")
                ):
                    found.append((node.lineno, arg.value[2:].replace("-", "_")))
        if isinstance(node, ast.ClassDef):  # a traitlet (or class attribute) named like an option
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
                    callee = getattr(stmt.value.func, "id", getattr(stmt.value.func, "attr", ""))
                    if callee in ("Unicode", "Integer", "Int", "Float", "Bool", "Dict", "List"):
                        found += [(stmt.lineno, t.id) for t in stmt.targets if isinstance(t, ast.Name)]
    return found


def test_no_face_redefines_an_engine_option_or_a_sampling_field():
    bad = [
        f"{path}:{line}: --{name.replace('_', '-')} is defined here; derive it with pagedq.options.add_arguments"
        for path in MODULES.values()
        for line, name in _literal_flags(path)
        if name in OPTIONS
    ]
    assert not bad, "\n".join(bad)


def test_flags_carry_the_fields_types_defaults_and_help():
    p = argparse.ArgumentParser()
    engine = add_arguments(p, EngineConfig, exclude=("model",), defaults={"max_num_seqs": 4})
    sampling = add_arguments(
        p, SamplingParams, exclude=("logit_bias",), dest_prefix="sp_", rename={"seed": "sampling-seed"}
    )
    a = p.parse_args(
        ["--block-size", "8", "--no-enable-prefix-caching", "--kv-cache-memory", "1GiB", "--temperature", "0.5",
         "--stop", "a", "--stop", "b", "--stop-token-ids", "7", "--sampling-seed", "3", "--seed", "9"]
    )  # fmt: skip
    kw = collect(a, engine)
    assert (kw["block_size"], kw["max_num_seqs"], kw["seed"]) == (8, 4, 9)
    assert (kw["enable_prefix_caching"], kw["kv_cache_memory"]) == (False, "1GiB")
    sp = SamplingParams(**collect(a, sampling))
    assert (sp.temperature, sp.stop_strings, sp.stop_token_ids, sp.seed) == (0.5, ["a", "b"], [7], 3)
    assert "tokens per KV block" in p.format_help()  # help from the field's metadata
    with pytest.raises(SystemExit):
        p.parse_args(["--block-size", "x"])  # typed from the annotation


def test_the_http_schema_and_the_client_take_the_sampling_fields():
    from pagedq.serve.client import _FIELDS
    from pagedq.serve.protocol import CompletionRequest

    props = CompletionRequest.model_json_schema()["properties"]
    assert set(wire_fields()) <= set(props)
    assert set(wire_fields()) <= set(_FIELDS)
    # every field of SamplingParams reaches HTTP, under its name or in the API's shape
    api_shaped = {"max_tokens", "logprobs", "prompt_logprobs", "logit_bias", "stop"}
    assert {f.name for f in dataclasses.fields(SamplingParams) if f.init} == set(wire_fields()) | api_shaped
    assert props["repetition_penalty"]["description"].startswith("CTRL-style penalty")
    assert {"beam_width", "length_penalty"} <= {f.name for f in dataclasses.fields(BeamSearchParams)}


def test_every_module_was_scanned():
    assert any(path.endswith(os.path.join("jupyter_ext", "serverext.py")) for path in MODULES.values())
