"""The notebook face against a real IPython kernel (jupyter_client): magics, streaming
display messages, interrupts, load/unload cycles, and the widgets' models without a browser."""

from __future__ import annotations

import json
import queue
import time

import pytest

pytest.importorskip(
    "ipykernel", reason="the notebook tests need the jupyter extra (pip install 'pagedq[jupyter]')"
)
jupyter_client = pytest.importorskip("jupyter_client")


class Kernel:
    def __init__(self):
        self.km, self.kc = jupyter_client.manager.start_new_kernel(kernel_name="python3")

    def run(self, code: str, timeout: float = 120, on_message=None) -> list[dict]:
        """Execute ``code``; return its iopub messages (raises on an error reply)."""
        msg_id = self.kc.execute(code)
        msgs = []
        deadline = time.time() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.time()))
            except queue.Empty as e:
                raise TimeoutError(f"no reply to {code!r} within {timeout}s") from e
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            msgs.append(msg)
            if on_message is not None:
                on_message(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:  # a late reply to an earlier request
            reply = self.kc.get_shell_msg(timeout=timeout)
        self.last_reply = reply
        if reply["content"]["status"] == "error":
            raise AssertionError("\n".join(reply["content"]["traceback"]))
        return msgs

    def value(self, expr: str):
        msgs = self.run(f"import json as _j; print(_j.dumps({expr}))")
        text = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
        return json.loads(text)

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tiny_llama):
    k = Kernel()
    k.run("%load_ext pagedq")
    k.run(f"%pagedq load {tiny_llama} --dtype float32")
    yield k
    k.close()


def _texts(msgs, kind):
    return [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == kind]


@pytest.mark.slow  # starts a kernel (tests/test_magics.py: in process)
def test_generate_streams_display_updates_and_stores_the_output(kernel, tiny_llama):
    msgs = kernel.run("%%generate --max-tokens 24 --temperature 0 -o out\ndef main(argv):\n    ")
    kinds = [m["msg_type"] for m in msgs if m["msg_type"] in ("display_data", "update_display_data")]
    assert kinds[0] == "display_data"
    assert kinds.count("update_display_data") >= 1
    final = _texts(msgs, "update_display_data")[-1]
    text = kernel.value("out.outputs[0].text")
    assert final.startswith(text)
    assert "24 tokens" in final
    from pagedq import LLM, SamplingParams

    with LLM(tiny_llama, dtype="float32") as llm:
        ref = llm.generate(
            "def main(argv):\n    ", SamplingParams(temperature=0, max_tokens=24), use_tqdm=False
        )
    assert text == ref[0].outputs[0].text


@pytest.mark.slow  # starts a kernel (tests/test_magics.py: in process)
def test_generate_help(kernel):
    kernel.run("%%generate?\n")
    pages = [
        p["data"]["text/plain"] for p in kernel.last_reply["content"]["payload"] if p.get("source") == "page"
    ]
    assert pages
    assert "--max-tokens" in pages[0]
    assert "--background" in pages[0]
    assert "{name}" in pages[0]


@pytest.mark.slow  # starts a kernel (tests/test_magics.py: in process)
def test_generate_interpolates_samples_side_by_side_and_chat(kernel):
    kernel.run("name = 'parser'")
    msgs = kernel.run(
        "%%generate --max-tokens 8 --temperature 1 --seed 3 --n 3 -o out\nimport {name} {unknown}"
    )
    assert kernel.value("out.prompt") == "import parser {unknown}"
    assert kernel.value("len(out.outputs)") == 3
    last = [m for m in msgs if m["msg_type"] == "update_display_data"][-1]["content"]["data"]
    assert last["text/html"].count("sample ") == 3
    kernel.run("%%generate --chat --system 'be brief' --max-tokens 4 -o chat\nhello")
    assert kernel.value("chat.prompt") == "hello"
    assert len(kernel.value("chat.prompt_token_ids")) > 3


@pytest.mark.slow  # starts a kernel (tests/test_magics.py: in process)
def test_interrupt_aborts_and_frees_every_block(kernel):
    seen = []

    def on_message(msg):
        if msg["msg_type"] == "update_display_data" and not seen:
            seen.append(msg)
            kernel.km.interrupt_kernel()

    kernel.run("%%generate --max-tokens 1500 --temperature 1\nfor i in range(10):", on_message=on_message)
    assert seen
    assert kernel.value("__import__('pagedq').jupyter_ext.session.llm.stats()['kv_blocks_in_use']") == 0
    kernel.run("%%generate --max-tokens 5 -o again\nx = 1")
    assert len(kernel.value("again.outputs[0].token_ids")) == 5


@pytest.mark.slow  # starts a kernel (tests/test_magics.py: in process)
def test_background_generations_batch_together(kernel):
    msgs = kernel.run("%%generate --background --max-tokens 400 --temperature 0 -o b1\nimport os")
    assert "Generation" in str(
        [m["content"] for m in msgs if m["msg_type"] == "execute_result"]
    )  # returned at once
    kernel.run("%%generate --background --max-tokens 400 --temperature 0 -o b2\nimport sys")
    kernel.run(
        "import time\nfrom pagedq.jupyter_ext import session\n"
        "t0 = time.time()\nwhile not ('b1' in globals() and 'b2' in globals()) and time.time() - t0 < 60: time.sleep(0.05)"
    )
    assert kernel.value("[len(b1.outputs[0].token_ids), len(b2.outputs[0].token_ids)]") == [400, 400]
    # both ran in one engine, batched: far fewer steps than two generations one after the other
    assert kernel.value("session.llm.stats()['num_steps']") < 600


@pytest.mark.slow  # starts a kernel (tests/test_magics.py: in process)
def test_status_and_unload_load_cycles_keep_memory_bounded(kernel, tiny_llama):
    msgs = kernel.run("%pagedq status")
    html = next(m for m in msgs if m["msg_type"] == "execute_result")["content"]["data"]["text/html"]
    assert "blocks used" in html
    assert "tok/s" in html
    rss = "int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    kernel.run("%pagedq unload")
    kernel.run(f"%pagedq load {tiny_llama} --dtype float32 --kv-cache-memory 64MiB")
    kernel.run("%%generate --max-tokens 8\nx")
    kernel.run("%pagedq unload")
    before = kernel.value(rss)
    for _ in range(10):
        kernel.run(f"%pagedq load {tiny_llama} --dtype float32 --kv-cache-memory 64MiB")
        kernel.run("%%generate --max-tokens 8\nx")
        kernel.run("%pagedq unload")
    after = kernel.value(rss)
    assert after - before < 50 * 1024, (
        f"resident memory grew by {(after - before) // 1024} MiB over 10 load/unload cycles"
    )
    msgs = kernel.run("%pagedq status")
    assert "none loaded" in json.dumps([m["content"] for m in msgs])


def test_playground_and_kv_view_models(tiny_llama):
    from pagedq.jupyter_ext import kv_cache_view, playground

    from pagedq import LLM, SamplingParams

    with LLM(tiny_llama, dtype="float32", block_size=4) as llm:
        pg = playground(llm)
        pg.prompt.value = "def main(argv):\n    "
        pg.temperature.value, pg.max_tokens.value, pg.n.value, pg.seed.value = 1.0, 12, 3, 7
        pg.generate_button.click()
        out = pg.wait()
        assert [b.value for b in pg.samples.children] == [c.text for c in out.outputs]
        assert "tok/s" in pg.rate.value
        assert not pg.generate_button.disabled
        assert pg.stop_button.disabled
        ref = llm.generate(
            "def main(argv):\n    ",
            SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7),
            use_tqdm=False,
        )[0]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
        # Stop while tokens stream: the request is aborted and its blocks freed
        view = kv_cache_view(llm, live=False)
        pg.max_tokens.value, pg.n.value = 1000, 2
        pg.generate_button.click()
        deadline = time.time() + 30
        snap = view.refresh()
        while not any(b["state"] == "shared" for b in snap["blocks"]) and time.time() < deadline:
            snap = view.refresh()
        pg.stop_button.click()
        stopped = pg.wait()
        assert all(c.finish_reason == "abort" for c in stopped.outputs)
        assert llm.stats()["kv_blocks_in_use"] == 0
        shared = [b for b in snap["blocks"] if b["state"] == "shared"]
        assert shared
        assert all(b["ref"] == 2 and len(b["owners"]) == 1 for b in shared)
        assert "shared (outlined)" in view.html.value
        # bad input shows an error instead of raising into the frontend
        pg.prompt.value = ""
        pg.generate_button.click()
        assert "prompt is empty" in pg.error.value
        assert not pg.generate_button.disabled


def test_llm_api_goes_through_the_driver_thread(tiny_llama):
    """With a driver (as in a notebook), LLM.generate / stream / next_token_logprobs submit to
    its thread, so they batch with a background generation instead of racing it."""
    from pagedq import LLM, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32") as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS_J, greedy, use_tqdm=False)]
        dist = llm.next_token_logprobs(PROMPTS_J[0])[0]
        driver = llm.start_driver()
        assert llm.driver is driver
        assert llm.start_driver() is driver
        bg = driver.submit(
            "for i in range(10):", SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
        )
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS_J, greedy, use_tqdm=False)]
        # the background request was still running alongside (1500 steps: margin for a busy machine)
        assert not bg.done.is_set()
        streamed = [o for o in llm.stream(PROMPTS_J[:1], greedy)]
        assert streamed[-1].finished
        assert streamed[-1].outputs[0].token_ids == ref[0]
        d2 = llm.next_token_logprobs(PROMPTS_J[0])[0]
        assert len(bg.result(60).outputs[0].token_ids) == 1500
    assert got == ref
    assert (d2 - dist).abs().max() < 1e-4


PROMPTS_J = ["def main(argv):\n    ", "import os\n", "x = 1"]
