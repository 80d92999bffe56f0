"""The dashboard's HTML, rendered on the server: every value escaped here, in one place. The page polls `/fragment`
every few seconds with a few lines of plain JavaScript and swaps the live part in; without JavaScript it still shows
the state of the moment it was loaded (and `/api/state` gives the same as JSON)."""

from __future__ import annotations

import datetime
import html
from typing import Any

REFRESH_MS = 2000


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def num(v: Any) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.3g}" if isinstance(v, float) else esc(v)


def secs(v: Any) -> str:
    if not isinstance(v, int | float):
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"


def when(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    try:
        return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):  # a time no clock shows: the page still renders
        return "-"


def spark(values: list[Any], colour: str, w: int = 180, h: int = 28) -> str:
    """A line of the last minutes as inline SVG (no chart library)."""
    pts = [v if isinstance(v, int | float) else 0 for v in values]
    top = max(pts) if pts and max(pts) > 0 else 1
    step = w / max(1, len(pts) - 1)
    path = " ".join(f"{i * step:.1f},{h - 2 - (v / top) * (h - 4):.1f}" for i, v in enumerate(pts))
    return (f'<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}"><polyline fill="none" '
            f'stroke="{colour}" stroke-width="1.5" points="{path}"/></svg>')


def live(state: dict[str, Any]) -> str:
    """The part of the page that refreshes."""
    out = [f'<p class="meta">updated {when(state.get("updated"))}; queues from {esc(state.get("queue_source"))}; '
           f'{num(state["history"]["events"])} events replayed since {when(state["history"]["since"] or None)}</p>']
    out.append('<h2>Queues</h2><table id="queues"><tr><th>queue</th><th>ready</th><th>unacked</th><th>consumers</th>'
               '<th>dead letters</th></tr>')
    for q in state.get("queues", []):
        dead = (q.get("dead") or {}).get("ready")
        if not q.get("exists", True):
            out.append(f'<tr><td>{esc(q["name"])}</td><td colspan="4">does not exist</td></tr>')
            continue
        out.append(f'<tr><td>{esc(q["name"])}</td><td class="n ready">{num(q.get("ready"))}</td>'
                   f'<td class="n">{num(q.get("unacked"))}</td><td class="n">{num(q.get("consumers"))}</td>'
                   f'<td class="n">{num(dead)}</td></tr>')
    out.append("</table>")
    workers = state.get("workers", [])
    out.append(f'<h2>Workers ({len(workers)})</h2><table id="workers"><tr><th>host</th><th>pid</th><th>version</th>'
               '<th>up</th><th>threads</th><th>running now</th></tr>')
    for w in workers:
        running = "<br>".join(f'{esc(r.get("task"))} <span class="id">{esc(r.get("message_id"))}</span>'
                              for r in w.get("running") or []) or "idle"
        out.append(f'<tr><td>{esc(w.get("host"))}</td><td class="n">{esc(w.get("pid"))}</td><td>{esc(w.get("version"))}'
                   f'</td><td class="n">{secs(w.get("uptime"))}</td><td class="n">{esc(w.get("threads"))}</td>'
                   f"<td>{running}</td></tr>")
    out.append("</table>")
    h = state["history"]
    out.append('<h2>Tasks</h2><table id="tasks"><tr><th>task</th><th>succeeded</th><th>failed</th><th>cancelled</th>'
               '<th>per min (5 min)</th><th>p50</th><th>p95</th><th>last hour: done, failed, latency</th></tr>')
    for t in h["tasks"]:
        out.append(f'<tr><td>{esc(t["task"])}</td><td class="n">{num(t["succeeded"])}</td>'
                   f'<td class="n fail">{num(t["failed"])}</td><td class="n">{num(t["cancelled"])}</td>'
                   f'<td class="n">{t["rate_per_min"]:.1f}</td><td class="n">{secs(t["p50"])}</td>'
                   f'<td class="n">{secs(t["p95"])}</td><td>{spark(t["series_done"], "#2a7")}'
                   f'{spark(t["series_failed"], "#c33")}{spark(t["series_latency"], "#36c")}</td></tr>')
    out.append('</table><h2>Recent failures</h2><table id="failures"><tr><th>time</th><th>task</th><th>outcome</th>'
               "<th>reason</th><th>error</th><th>message</th><th>worker</th></tr>")
    for f in h["failures"]:
        out.append(f'<tr><td>{when(f.get("t"))}</td><td>{esc(f.get("task"))}</td><td>{esc(f.get("event"))}</td>'
                   f'<td>{esc(f.get("reason"))}</td><td class="err">{esc(f.get("error"))}</td>'
                   f'<td class="id">{esc(f.get("id"))}</td><td>{esc(f.get("host"))}:{esc(f.get("pid"))}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


ACTIONS = """<h2>Actions</h2><form id="actions" onsubmit="return act(event)">
<input id="token" type="password" placeholder="token" autocomplete="off">
<input id="ids" placeholder="message ids to cancel, space separated"> <button name="op" value="cancel">Cancel</button>
<input id="queue" placeholder="queue whose dead letters to replay"> <button name="op" value="replay">Replay</button>
<span id="result"></span></form>"""

SCRIPT = """<script>
async function refresh() {
  try { const r = await fetch('fragment'); if (r.ok) document.getElementById('live').innerHTML = await r.text(); }
  catch (e) {}
}
setInterval(refresh, REFRESH_MS);
async function act(ev) {
  ev.preventDefault();
  const op = ev.submitter.value, token = document.getElementById('token').value;
  const body = op === 'cancel' ? {ids: document.getElementById('ids').value.split(/\\s+/).filter(Boolean)}
                               : {queue: document.getElementById('queue').value};
  const r = await fetch('api/' + op, {method: 'POST', headers: {'Content-Type': 'application/json',
                        'Authorization': 'Bearer ' + token}, body: JSON.stringify(body)});
  document.getElementById('result').textContent = (await r.json()).message;
  return false;
}
</script>""".replace("REFRESH_MS", str(REFRESH_MS))

STYLE = """<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; } th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.fail, .err { color: #b22; } .id { font-family: monospace; font-size: 12px; color: #555; } .meta { color: #666; }
svg.spark { margin-right: 6px; vertical-align: middle; background: #fafafa; }
</style>"""


def page(state: dict[str, Any], actions: bool) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>magne dashboard</title>{STYLE}</head><body>'
            f'<h1>magne</h1><div id="live">{live(state)}</div>{ACTIONS if actions else ""}{SCRIPT}</body></html>')
