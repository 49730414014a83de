"""Self-contained offline HTML: the Explorer's views and their data in one file that opens from file://
with no network. JS and CSS are inlined; the widget state and a set of precomputed view answers are
embedded as gzip-compressed binary (base64). Without a kernel nothing re-runs: selections, hovers and
tabs work on what was exported. The logit-lens grid is always exported whole ([L, T]), also for the long
prompts whose live Explorer computes it window by window."""
from __future__ import annotations

import base64
import gzip
import json
import pathlib

from .errors import LensvizError
from .views import payload

_SHIM = r"""
// A stand-in for the anywidget model: state from the export, answers to view requests from a table.
async function unpack(id) {
  const raw = Uint8Array.from(atob(document.getElementById(id).textContent.trim()), (c) => c.charCodeAt(0));
  const text = await new Response(new Blob([raw]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
  const toView = (b64) => { const u = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)); return new DataView(u.buffer); };
  return JSON.parse(text, (k, v) => (v && typeof v === "object" && typeof v.$b64 === "string" ? toView(v.$b64) : v));
}
const keyOf = (msg) => JSON.stringify(Object.keys(msg).filter((k) => k !== "type" && k !== "id").sort().map((k) => [k, msg[k]]));
class StaticModel {
  constructor(state, replies) { this.state = state; this.replies = replies; this.handlers = {}; }
  get(k) { return this.state[k]; }
  set(k, v) { this.state[k] = v; this.emit("change:" + k); }
  save_changes() {}
  on(ev, f) { (this.handlers[ev] = this.handlers[ev] || []).push(f); }
  off(ev, f) { this.handlers[ev] = (this.handlers[ev] || []).filter((g) => g !== f); }
  emit(ev, ...args) { for (const f of this.handlers[ev] || []) f(...args); }
  send(msg) {
    setTimeout(() => {
      if (msg.type === "get") {
        const r = this.replies[keyOf(msg)];
        if (r) this.emit("msg:custom", { type: "reply", id: msg.id, what: msg.what, meta: r.meta }, r.buffers);
        else this.emit("msg:custom", { type: "reply", id: msg.id, what: msg.what,
          error: "not included in this static export (re-open the notebook with a kernel to compute it)" });
      }
      // Anything else (run, generate, step, stop) needs a kernel: no answer, so the widget says so
      // calmly within a second (its "no kernel" note, worded for a static page) and puts its
      // controls back to the state shown.
    }, 0);
  }
}
const data = await unpack("lv-data");
const model = new StaticModel(data.state, data.replies);
const url = URL.createObjectURL(new Blob([data.state._explorer], { type: "text/javascript" }));
const explorer = (await import(url)).default;
await explorer.render({ model, el: document.getElementById("lv-root") });
document.body.dataset.ready = "1";
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' blob:; style-src 'unsafe-inline'; img-src data: blob:">
<style>{css}</style></head>
<body><div id="lv-root"></div>
<script type="application/octet-stream" id="lv-data">{data}</script>
<script type="module">{shim}</script>
</body></html>
"""


ALL_HEADS_UPTO = 512   # longer prompts: only the selected head's maps are exported (2048^2 B each)


def _key(req: dict) -> str:
    return json.dumps([[k, req[k]] for k in sorted(req) if k not in ("type", "id")], separators=(",", ":"),
                      ensure_ascii=False)


def _requests(ex) -> list[dict]:
    """The view requests answered ahead of time: every head's maps for short prompts (else the selected
    layer's; past ALL_HEADS_UPTO tokens the selected head's only), all thumbnails, cell top-k for every cell of a small grid (else the last position),
    neurons at every layer of the selected position, the Backward Lens tables and their cells at the selected
    position (hover), and one flow graph."""
    tr, lens, sel = ex.trace, ex.lens, ex.selection
    t, n_layers, n_heads = len(tr), lens.n_layers, lens.n_heads
    kinds = ["forward", "reversed"] if tr.has_backward else ["forward"]
    map_layers = range(n_layers) if t <= 64 else [sel["layer"]]
    map_heads = range(n_heads) if t <= ALL_HEADS_UPTO else [sel["head"]]   # a T x T map is T^2 bytes
    reqs = [{"what": "thumbs", "layer": layer, "kind": k} for layer in range(n_layers) for k in kinds]
    reqs += [{"what": "attention", "layer": layer, "head": h, "kind": "forward"}
             for layer in map_layers for h in map_heads]
    if tr.has_backward:   # the reversed map is asked for with its colour scale (payload.MAP_SCALES)
        reqs += [{"what": "attention", "layer": layer, "head": h, "kind": "reversed", "scale": s}
                 for layer in map_layers for h in map_heads for s in payload.MAP_SCALES]
    positions = range(t) if n_layers * t <= 1500 else [sel["position"]]
    reqs += [{"what": "cell", "layer": layer, "position": p, "site": ex.site} for layer in range(n_layers)
             for p in positions]
    reqs += [{"what": "neurons", "layer": layer, "position": sel["position"], "include": []} for layer in range(n_layers)]
    if tr.has_backward:
        reqs.append({"what": "backward"})
        reqs += [{"what": "bl_cell", "layer": layer, "position": sel["position"], "part": part}
                 for layer in range(n_layers) for part in ("ff2", "ff1")]
        reqs.append({"what": "flow", "position": sel["position"], "layers": [sel["layer"]]})
    reqs += [{"what": "importance", "measure": m} for m in ("dla", "ablation", "ra", "norm")]   # the head grid
    if ex.pair.get("clean_prompt") is not None:   # a prompt pair's heatmaps: attribution, and exact where computed
        reqs += [{"what": "sweep", "site": s, "method": m} for s in ("pre", "mid", "post", "head")
                 for m in ("attribution", "exact")]
    return reqs


def _encode(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def export_html(explorer_or_trace, path, *, title: str | None = None) -> pathlib.Path:
    """Write one self-contained HTML file showing the explorer (or a trace) offline; returns the path."""
    from .trace import Trace
    from .views import payload
    from .views.explorer import STATIC, Explorer

    if isinstance(explorer_or_trace, Trace):
        ex = Explorer.from_trace(explorer_or_trace)
    elif isinstance(explorer_or_trace, Explorer):
        ex = explorer_or_trace
    else:
        raise LensvizError(f"export_html takes an Explorer or a Trace, got {type(explorer_or_trace).__name__}")
    state = {k: v for k, v in ex.get_state().items() if not k.startswith("_") or k == "_modules"}
    if ex.grid_meta.get("lazy"):     # a long prompt's grid came in windows: the page gets all of it
        state.update(ex.full_grid_state())
    state["_explorer"] = (STATIC / "explorer.js").read_text()
    state["_static"] = True          # the page has no kernel: explorer.js words its note for that
    state["error"] = ""              # nothing has gone wrong on a page that has just opened
    replies = {}
    requests = _requests(ex)
    cells = [r for r in requests if r["what"] == "cell"]  # answered together: one batched projection
    for req, meta in zip(cells, payload.cell_topks(ex.trace, [(r["layer"], r["position"]) for r in cells], ex.site)):
        replies[_key(req)] = {"meta": meta, "buffers": []}
    for req in requests:
        if req["what"] == "cell":
            continue
        try:
            meta, buffers = ex.answer(req)
        except LensvizError:
            continue
        replies[_key(req)] = {"meta": meta, "buffers": [bytes(b) for b in buffers]}
    blob = json.dumps(_encode({"state": state, "replies": replies}), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=float)
    data = base64.b64encode(gzip.compress(blob.encode(), 9, mtime=0)).decode()
    page = _PAGE.format(title=_escape(title or f"lensviz · {ex.prompt[:60]}"), css=(STATIC / "style.css").read_text(),
                        data=data, shim=_SHIM)
    out = pathlib.Path(path)
    out.write_text(page, encoding="utf-8")
    return out


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))
