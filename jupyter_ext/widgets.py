"""ipywidgets: a sampling playground and a live picture of the KV block pool.

Both talk to the engine through the kernel's :class:`EngineDriver`, so what they start batches
with the cells' generations. Updates are throttled (``Playground`` at most every
``UPDATE_INTERVAL``, ``KVCacheView`` every ``REFRESH_INTERVAL``) so a fast engine does not
flood the frontend with messages.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import threading
import time

import ipywidgets as W

from .magics import driver_for, session

UPDATE_INTERVAL = 0.1
REFRESH_INTERVAL = 0.25
MAX_DRAWN_BLOCKS = 4096


class Playground:
    """Prompt, sampling sliders, Generate / Stop, samples streaming side by side, live tokens/s."""

    def __init__(self, llm=None):
        from pagedq.sampling_params import SamplingParams  # noqa: F401  (fail early if pagedq is broken)

        self.llm = llm if llm is not None else session.require()[0]
        self.driver = driver_for(llm)
        self.prompt = W.Textarea(
            value="def fibonacci(n):\n", description="prompt", layout=W.Layout(width="100%", height="6em")
        )
        self.temperature = W.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.05, description="temperature")
        self.top_p = W.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top_p")
        self.top_k = W.IntSlider(value=0, min=0, max=200, description="top_k")
        self.max_tokens = W.IntSlider(value=64, min=1, max=1024, description="max_tokens")
        self.n = W.IntSlider(value=1, min=1, max=4, description="n")
        self.seed = W.IntText(value=0, description="seed")
        self.generate_button = W.Button(description="Generate", button_style="primary")
        self.stop_button = W.Button(description="Stop", button_style="warning", disabled=True)
        self.samples = W.HBox([])
        self.rate = W.Label(value="")
        self.error = W.HTML(value="")
        self.generation = None
        self._last = 0.0
        self.generate_button.on_click(self._on_generate)
        self.stop_button.on_click(self._on_stop)
        controls = W.VBox([self.temperature, self.top_p, self.top_k, self.max_tokens, self.n, self.seed])
        self.widget = W.VBox(
            [
                self.prompt,
                controls,
                W.HBox([self.generate_button, self.stop_button, self.rate]),
                self.error,
                self.samples,
            ]
        )

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _on_generate(self, _=None) -> None:
        from pagedq.sampling_params import SamplingParams

        if self.generation is not None and not self.generation.done.is_set():
            return  # one generation at a time per playground
        self.error.value = ""
        try:
            params = SamplingParams(
                n=self.n.value,
                temperature=self.temperature.value,
                top_p=self.top_p.value,
                top_k=self.top_k.value,
                max_tokens=self.max_tokens.value,
                seed=self.seed.value,
            )
            gen = self.driver.submit(self.prompt.value, params)
        except ValueError as e:
            self.error.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
            return
        self.samples.children = [
            W.Textarea(value="", layout=W.Layout(width=f"{100 // self.n.value - 1}%", height="14em"))
            for _ in range(self.n.value)
        ]
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self.generation = gen
        gen.on_output(self._on_output)

    def _on_stop(self, _=None) -> None:
        if self.generation is not None:
            self.generation.cancel()

    def _on_output(self, out) -> None:
        now = time.perf_counter()
        if not out.finished and now - self._last < UPDATE_INTERVAL:
            return
        self._last = now
        for box, c in zip(self.samples.children, out.outputs):
            box.value = c.text
        gen = self.generation
        self.rate.value = f"{gen.tokens_per_second:.1f} tok/s" if gen is not None else ""
        if out.finished:
            reasons = ", ".join(sorted({str(c.finish_reason) for c in out.outputs}))
            self.rate.value += f" — done ({reasons})"
            self.generate_button.disabled, self.stop_button.disabled = False, True

    def wait(self, timeout: float | None = 60):
        """The final output of the current generation (for scripts and tests)."""
        return self.generation.result(timeout)


def kv_snapshot(engine) -> dict:
    """The block pool as plain data: per block its state, owners, ref count and fill."""
    bm = engine.block_manager
    bs = bm.block_size
    owners: dict[int, set[str]] = {}
    fill: dict[int, int] = {}
    for seq in bm.holders():
        rid = seq.request.request_id
        for i, b in enumerate(seq.block_table):
            owners.setdefault(b, set()).add(rid)
            f = max(0, min(bs, seq.num_computed_tokens - i * bs))
            fill[b] = max(fill.get(b, 0), f)
    free = set(bm.free_queue)
    blocks = []
    for b in range(bm.num_blocks):
        if b in free:
            state = "cached" if bm.block_key[b] is not None else "free"
        else:
            state = "shared" if bm.ref_counts[b] > 1 else "used"
        blocks.append(
            {
                "state": state,
                "owners": sorted(owners.get(b, ())),
                "ref": bm.ref_counts[b],
                "fill": fill.get(b, bs if state == "cached" else 0),
            }
        )
    return {"block_size": bs, "num_blocks": bm.num_blocks, "blocks": blocks}


def _color(rid: str) -> str:
    h = int(hashlib.md5(rid.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    r, g, b = colorsys.hls_to_rgb(h, 0.55, 0.65)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def render_snapshot(snap: dict) -> str:
    """HTML: one square per block, colored by owning request, outlined when shared, filled to
    its occupancy; cached (free but reusable) blocks light grey, free blocks white."""
    bs = snap["block_size"]
    cells = []
    counts = {"used": 0, "shared": 0, "cached": 0, "free": 0}
    for i, blk in enumerate(snap["blocks"]):
        counts[blk["state"]] += 1
        if i >= MAX_DRAWN_BLOCKS:
            continue
        st = blk["state"]
        if st in ("used", "shared"):
            color = _color(blk["owners"][0]) if blk["owners"] else "#888"
            pct = int(100 * blk["fill"] / bs)
            bg = f"linear-gradient(to top, {color} {pct}%, #eee {pct}%)"
            border = "2px solid #222" if st == "shared" else "1px solid #bbb"
        else:
            bg = "#ddd" if st == "cached" else "#fff"
            border = "1px solid #ccc"
        title = f"block {i}: {st}, ref {blk['ref']}, {blk['fill']}/{bs} tokens, requests {', '.join(blk['owners']) or '-'}"
        cells.append(
            f"<span title='{html.escape(title)}' style='display:inline-block;width:10px;height:10px;"
            f"margin:1px;background:{bg};border:{border};box-sizing:border-box'></span>"
        )
    more = f" (first {MAX_DRAWN_BLOCKS} drawn)" if len(snap["blocks"]) > MAX_DRAWN_BLOCKS else ""
    legend = (
        f"<div style='font-size:smaller'>{snap['num_blocks']} blocks of {bs} tokens{more}: "
        f"{counts['used']} used, {counts['shared']} shared (outlined), {counts['cached']} cached (grey), "
        f"{counts['free']} free</div>"
    )
    return legend + "<div style='line-height:0'>" + "".join(cells) + "</div>"


class KVCacheView:
    """A live picture of the block pool (see :func:`render_snapshot`)."""

    def __init__(self, llm=None, live: bool = True):
        self.llm = llm if llm is not None else session.require()[0]
        self.driver = driver_for(llm)
        self.html = W.HTML(value="")
        self.widget = W.VBox([self.html])
        self.snapshot: dict | None = None
        self._stop = threading.Event()
        self.refresh()
        self._thread = None
        if live:
            self._thread = threading.Thread(target=self._loop, name="pagedq-kv-view", daemon=True)
            self._thread.start()

    def refresh(self) -> dict:
        with self.driver.caller_lock():
            snap = kv_snapshot(self.llm.engine)
        self.snapshot = snap
        value = render_snapshot(snap)
        if value != self.html.value:
            self.html.value = value
        return snap

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_INTERVAL):
            if self.llm.engine._closed:
                return
            self.refresh()

    def close(self) -> None:
        self._stop.set()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
