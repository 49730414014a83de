"""Regenerate docs/images/explorer_*.png: one screenshot per view of the Explorer widget (logit lens,
attention, Reversed Attention, neurons, Backward Lens, flow graph, generation step-through), from the
embedded SmolLM2-135M-Instruct on the Reversed Attention paper's prompt. The Explorer is exported with
lv.export_html and the page shot in headless Chromium (harness/browser.py's launch flags, every request
off file:// blocked): no kernel, no network. Run from the repository root: python docs/widget_images.py
(about two minutes on 2 shared CPU cores)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lensviz as lv  # noqa: E402
from harness.browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from lensviz.lenses.reversed import rank_heads  # noqa: E402

PROMPT = "I like Italy and France. I visited the city of"
TARGET = " Florence"
OUT = ROOT / "docs" / "images"
# (file name, tab, what must be drawn first, the element shot)
VIEWS = [("explorer_logit_lens", "attention", ".lv-grid .lv-cell", ".lv-left"),
         ("explorer_attention", "attention", "canvas.lv-map-forward", ".lv-panel"),
         ("explorer_reversed_attention", "reversed", ".lv-scale-tick", ".lv-panel"),
         ("explorer_neurons", "neurons", ".lv-neuron-table .lv-toggle", ".lv-panel"),
         ("explorer_backward_lens", "backward", ".lv-bl-ff2 .lv-bl-cell", ".lv-panel"),
         ("explorer_flow_graph", "flow", "svg.lv-flow .lv-node", ".lv-panel")]


def shoot(page, html: Path, views, whole: str | None = None) -> None:
    page.goto(html.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    for name, tab, ready, element in views:
        page.locator(f'.lv-tab[data-tab="{tab}"]').click()
        page.locator(ready).first.wait_for(state="visible")
        page.mouse.move(0, 0)          # no hover tooltip in the shot
        page.wait_for_timeout(400)
        page.locator(element).first.screenshot(path=str(OUT / f"{name}.png"))
        print(f"  docs/images/{name}.png", flush=True)
    if whole:
        page.locator(".lv-explorer").first.screenshot(path=str(OUT / f"{whole}.png"))
        print(f"  docs/images/{whole}.png", flush=True)


def main() -> int:
    from playwright.sync_api import sync_playwright

    lens = lv.load(progress=False)
    ex = lv.Explorer(lens, PROMPT, target=TARGET)
    # the layer and head of the largest ||RA|| (the paper's Fig. 1 head), the target's position
    best = rank_heads(ex.trace, top=1)[0]
    ex.selection = {**ex.selection, "layer": best.layer, "head": best.head}
    gen = lv.Explorer(lens, PROMPT, generate=8)
    gen.step = 4
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        a, b = lv.export_html(ex, Path(tmp) / "views.html"), lv.export_html(gen, Path(tmp) / "steps.html")
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "blob:", "data:"))
                  else route.abort())
        page = ctx.new_page()
        shoot(page, a, VIEWS, whole="explorer")
        page.goto(b.as_uri())
        page.wait_for_selector("body[data-ready='1']")
        page.locator(".lv-stepper").wait_for(state="visible")
        page.wait_for_timeout(400)
        box = page.locator(".lv-explorer").first.bounding_box()
        page.screenshot(path=str(OUT / "explorer_step_through.png"),
                        clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": 420})
        print("  docs/images/explorer_step_through.png", flush=True)
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
