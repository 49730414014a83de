"""Checks computed in the browser on a rendered Explorer: WCAG text contrast, the computed styles of
its controls (to compare hosts), and what has keyboard focus.

    ratios = contrast_report(page.locator(".lv-explorer").first)   # [{text, cls, ratio, fg, bg}, ...]
    styles = control_styles(page.locator(".lv-explorer").first)    # {selector: {property: value}}
"""
from __future__ import annotations

# Every visible element with its own text: its colour against the background behind it (ancestors'
# background colours composited, alpha included, down to the page's), WCAG 2 contrast ratio.
_CONTRAST_JS = r"""(root) => {
  const rgba = (s) => { const m = s.match(/[\d.]+/g) || [0, 0, 0, 0]; return [+m[0], +m[1], +m[2], m.length > 3 ? +m[3] : 1]; };
  const over = (top, bottom) => { const a = top[3]; return [0, 1, 2].map((i) => top[i] * a + bottom[i] * (1 - a)).concat(1); };
  const lum = (c) => { const [r, g, b] = c.slice(0, 3).map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
  const backdrop = (el) => {
    const stack = [];
    for (let n = el; n; n = n.parentElement) {
      const c = rgba(getComputedStyle(n).backgroundColor);
      if (c[3] > 0) stack.push(c);
      if (c[3] >= 1) break;
    }
    let bg = [255, 255, 255, 1];
    if (!stack.length || stack[stack.length - 1][3] < 1) bg = rgba(getComputedStyle(document.body).backgroundColor)[3] >= 1
      ? rgba(getComputedStyle(document.body).backgroundColor) : bg;
    for (let i = stack.length - 1; i >= 0; i--) bg = over(stack[i], bg);
    return bg;
  };
  const out = [];
  for (const el of [root, ...root.querySelectorAll("*")]) {
    if (["STYLE", "SCRIPT", "CANVAS", "svg", "OPTION"].includes(el.tagName)) continue;
    const own = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join("").trim();
    const field = ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName) && el.type !== "checkbox" && el.type !== "radio" && el.type !== "range";
    if (!own && !(field && (el.value || "").trim())) continue;
    const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    if (!r.width || !r.height || cs.visibility === "hidden" || cs.display === "none") continue;
    const bg = backdrop(el), fg = over(rgba(cs.color), bg);
    out.push({ text: (own || el.value).slice(0, 30), cls: (el.className && el.className.baseVal === undefined ? el.className : el.tagName) || el.tagName,
               tag: el.tagName, ratio: Math.round(ratio(fg, bg) * 100) / 100,
               fg: cs.color, bg: `rgb(${bg.slice(0, 3).map(Math.round).join(",")})` });
  }
  return out;
}"""

# The controls the widget draws, one of each kind, and the properties a host reset would change.
CONTROLS = {
    "textarea": ".lv-prompt", "text": ".lv-target", "run": ".lv-run", "token": ".lv-token",
    "select": ".lv-colour", "radio": ".lv-site-post", "tab": ".lv-tab", "range": ".lv-eta",
    "field": ".lv-eta-layers", "button": ".lv-reset", "checkbox": ".lv-patchbox input[type=checkbox]",
}
PROPERTIES = ["font-family", "font-size", "font-weight", "line-height", "color", "background-color",
              "background-image", "border-top-width", "border-top-style", "border-top-color", "border-radius",
              "padding-top", "padding-left", "margin-top", "margin-left", "height", "min-height",
              "box-shadow", "text-transform", "letter-spacing", "appearance", "accent-color", "cursor",
              "outline-style", "box-sizing", "display", "word-spacing", "white-space", "font-feature-settings",
              "color-scheme", "caret-color", "text-indent", "vertical-align"]

_STYLES_JS = r"""(root, [controls, props]) => {
  const out = {};
  for (const [name, sel] of Object.entries(controls)) {
    const el = root.querySelector(sel);
    if (!el) { out[name] = null; continue; }
    const cs = getComputedStyle(el);
    out[name] = Object.fromEntries(props.map((p) => [p, cs.getPropertyValue(p)]));
  }
  return out;
}"""

# The focused element (inside shadow roots too), described, and whether its focus ring shows.
FOCUS_JS = r"""() => {
  let a = document.activeElement;
  while (a && a.shadowRoot && a.shadowRoot.activeElement) a = a.shadowRoot.activeElement;
  if (!a) return null;
  const cs = getComputedStyle(a);
  return { tag: a.tagName, cls: typeof a.className === "string" ? a.className : "", role: a.getAttribute("role"),
           label: a.getAttribute("aria-label") || a.textContent.slice(0, 20), type: a.type || "",
           inWidget: !!a.closest(".lv-explorer"), ring: cs.outlineStyle !== "none" && parseFloat(cs.outlineWidth) >= 2,
           outline: `${cs.outlineStyle} ${cs.outlineWidth} ${cs.outlineColor}` };
}"""


def contrast_report(locator) -> list[dict]:
    return locator.evaluate(_CONTRAST_JS)


def control_styles(locator) -> dict:
    return locator.evaluate(_STYLES_JS, [CONTROLS, PROPERTIES])


def focused(page) -> dict | None:
    return page.evaluate(FOCUS_JS)
