"""Run a workload on vLLM, in vLLM's own interpreter:
``python vllm_peer.py WORKLOAD.json MODEL RUNS [DTYPE [stepped]]``.

This file imports nothing from pagedq: ``pagedq bench ... --vllm-python PATH`` runs it with
another virtual environment's Python (vLLM's CPU build pins its own torch) and reads one JSON
line of results from its standard output. The workload file holds the exact token ids that
pagedq and HF ran. ``stepped`` (throughput workloads): after start-up the script prints
``PAGEDQ_PEER_READY``, then runs the workload once for each ``run`` line on its standard input,
answering ``PAGEDQ_PEER_RUN <seconds>``, and ends with the result line when its input closes;
so the caller alternates vLLM's runs with its own while vLLM stays loaded (start-up ~3 min).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    workload_path, model, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dtype = sys.argv[4] if len(sys.argv) > 4 else "bfloat16"
    with open(workload_path) as f:
        w = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=2048, seed=0)
    startup = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
    if w.get("mode") == "decode":
        # batch-1 decode, timed as pagedq's: ``n + 1`` tokens minus the first (the prefill),
        # after one warm-up request
        def timed(n: int) -> float:
            llm.reset_prefix_cache()
            sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            t0 = time.perf_counter()
            out = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            if len(out[0].outputs[0].token_ids) != n:
                raise SystemExit(f"vLLM produced {len(out[0].outputs[0].token_ids)} tokens, asked for {n}")
            return dt

        n = w["output_lens"][0]
        timed(2)
        first, seconds = [], []
        for _ in range(runs):
            first.append(timed(1))
            seconds.append(timed(n + 1) - first[-1])
        print("PAGEDQ_PEER_RESULT " + json.dumps({"startup": startup, "seconds": seconds, "first": first}))
        return
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in w["output_lens"]]

    def one_run() -> float:
        llm.reset_prefix_cache()  # every run starts cold, as pagedq's do
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        if got != sum(w["output_lens"]):
            raise SystemExit(f"vLLM produced {got} tokens, the workload asks for {sum(w['output_lens'])}")
        return dt

    seconds = []
    if len(sys.argv) > 5 and sys.argv[5] == "stepped":
        print(f"PAGEDQ_PEER_READY {startup}", flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                raise SystemExit(f"expected 'run' on standard input, got {line.strip()!r}")
            seconds.append(one_run())
            print(f"PAGEDQ_PEER_RUN {seconds[-1]}", flush=True)
    else:
        seconds = [one_run() for _ in range(runs)]
    print("PAGEDQ_PEER_RESULT " + json.dumps({"startup": startup, "seconds": seconds}), flush=True)


if __name__ == "__main__":  # vLLM spawns worker processes: the guard is required
    main()
