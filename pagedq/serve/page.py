"""The page for people: ``GET <prefix>`` (``/services/pagedq/`` on a hub, ``<base_url>pagedq/``
in a Jupyter server) shows the model, the engine's state, the queue, the KV pool and the
visitor's own usage beside everyone's. Server-rendered HTML, refreshed every few seconds; the
login is the face's own (the hub's OAuth, the Jupyter server's login page)."""

from __future__ import annotations

import contextlib
import html

from .errors import APIError
from .handlers import BaseHandler

REFRESH_SECONDS = 5


class PageHandler(BaseHandler):
    async def get(self):
        try:
            await self.authenticate()
        except APIError as e:
            url = self.state.identity.login_url(self) if e.code == "login_required" else None
            if url:
                self.redirect(url)
                return
            self.set_status(e.status)
            self.finish(_page("pagedq", f"<p class='error'>{html.escape(e.message)}</p>"))
            return
        user = self.state.identity.user_for(self.principal, None)
        self.finish(_page("pagedq", await self._body(user)))

    async def _body(self, user: str) -> str:
        state, sup = self.state, self.state.supervisor
        status = "draining" if state.draining else sup.state
        rows = [("model", state.model_name), ("engine", status), ("engine restarts", str(sup.restarts))]
        if sup.last_error:
            rows.append(("last engine failure", sup.last_error))
        stats: dict | None = None
        users: dict = {}
        if sup.ready:
            with contextlib.suppress(APIError):
                stats, users, _ = await sup.stats()
        out = [f"<p>Signed in as <b>{html.escape(user)}</b>.</p>", _table("Engine", rows)]
        if stats is not None:
            used, total = stats["kv_blocks_in_use"], stats["num_kv_blocks"]
            out.append(
                _table(
                    "Queue",
                    [
                        ("sequences running", str(stats["num_running"])),
                        ("sequences waiting", str(stats["num_waiting"])),
                        ("prompts in flight (all users)", str(state.admission.total)),
                        ("your prompts in flight", str(state.admission.per_user.get(user, 0))),
                    ],
                )
            )
            pct = 100.0 * used / total if total else 0.0
            bar = f"<div class='bar'><div style='width:{pct:.1f}%'></div></div>"
            out.append(
                _table(
                    "KV pool",
                    [
                        ("blocks in use", f"{used} of {total} ({pct:.1f}%) {bar}"),
                        ("block size", f"{stats['block_size']} tokens"),
                        ("cached prefix blocks", str(stats["prefix_cached_blocks"])),
                        ("waste in allocated blocks", f"{100 * stats['kv_waste']:.1f}%"),
                    ],
                )
            )
            mine = users.get(user)
            everyone = {
                k: sum(getattr(u, k) for u in users.values())
                for k in ("requests", "prompt_tokens", "generated_tokens", "computed_tokens")
            }
            share = (
                (mine.generated_tokens / everyone["generated_tokens"])
                if mine and everyone["generated_tokens"]
                else 0
            )
            head = "<tr><th></th><th>requests</th><th>prompt tokens</th><th>generated tokens</th><th>share of output</th></tr>"
            you = (
                f"<tr><td>you</td><td>{mine.requests}</td><td>{mine.prompt_tokens}</td><td>{mine.generated_tokens}</td>"
                f"<td>{100 * share:.1f}%</td></tr>"
                if mine
                else "<tr><td>you</td><td colspan='4'>no recent requests</td></tr>"
            )
            allrow = (
                f"<tr><td>everyone ({len(users)} recent users)</td><td>{everyone['requests']}</td>"
                f"<td>{everyone['prompt_tokens']}</td><td>{everyone['generated_tokens']}</td><td>100%</td></tr>"
            )
            out.append(f"<h2>Usage</h2><table>{head}{you}{allrow}</table>")
        else:
            out.append("<p>The engine is not serving right now; this page refreshes by itself.</p>")
        return "\n".join(out)


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v if '<div' in v else html.escape(v)}</td></tr>" for k, v in rows
    )
    return f"<h2>{html.escape(title)}</h2><table>{body}</table>"


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 48em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.3em 1em 0.3em 0; text-align: left; }}
.bar {{ display: inline-block; width: 12em; height: 0.8em; background: #eee; vertical-align: middle; }}
.bar div {{ height: 100%; background: #4a7; }}
.error {{ color: #a22; }}
</style></head>
<body><h1>pagedq: the shared engine</h1>
{body}
</body></html>"""
