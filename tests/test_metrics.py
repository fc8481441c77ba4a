"""Prometheus text of the engine's counters, gauges and latency histograms."""

from pagedq import LLM, SamplingParams
from pagedq.metrics import Histogram, prometheus_text


def test_histogram_buckets_are_upper_bounds_and_exported_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1, 1]
    assert h.count == 4
    assert abs(h.sum - 3.65) < 1e-12
    text = prometheus_text({"num_requests": 4}, "m", histograms={"time_to_first_token_seconds": h})
    assert 'pagedq_time_to_first_token_seconds_bucket{model="m",le="0.1"} 2.0' in text
    assert 'pagedq_time_to_first_token_seconds_bucket{model="m",le="1.0"} 3.0' in text
    assert 'pagedq_time_to_first_token_seconds_bucket{model="m",le="+Inf"} 4.0' in text
    assert 'pagedq_time_to_first_token_seconds_count{model="m"} 4.0' in text
    assert 'pagedq_num_requests_total{model="m"} 4.0' in text
    assert "# TYPE pagedq_time_to_first_token_seconds histogram" in text


def test_the_engine_times_first_tokens_and_requests(tiny_llama):
    with LLM(tiny_llama, dtype="float32") as llm:
        llm.generate(["a", "b", "c"], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
        llm.generate("d", SamplingParams(max_tokens=1), use_tqdm=False)
        lat = llm.engine.latency
        assert lat["time_to_first_token_seconds"].count == 4
        assert lat["e2e_request_latency_seconds"].count == 4
        assert lat["time_per_output_token_seconds"].count == 3  # one token: no time between tokens
        assert lat["e2e_request_latency_seconds"].sum >= lat["time_to_first_token_seconds"].sum > 0
