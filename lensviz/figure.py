"""The Figure class lensviz.plot returns: a matplotlib Figure that shows itself as a PNG in a notebook
with no `%matplotlib` line (IPython calls `_repr_png_`), and is otherwise a plain Figure."""
from __future__ import annotations

import io

from matplotlib.figure import Figure


class InlineFigure(Figure):
    """A `matplotlib.figure.Figure` with a PNG representation for IPython / Jupyter."""

    def _repr_png_(self) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        if self.canvas is None or type(self.canvas).__name__ == "FigureCanvasBase":
            FigureCanvasAgg(self)
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
        return buf.getvalue()
