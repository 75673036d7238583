"""Charts rendered on the server as inline SVG: no JavaScript, crisp on projectors, prints well.

Every function returns `markupsafe.Markup`; text that comes from data is escaped on the way in.
"""

from app.plots.heatmap import matrix_heatmap
from app.plots.histogram import histogram
from app.plots.lines import line_chart
from app.plots.scatter import ScatterPoint, scatter

__all__ = ["ScatterPoint", "histogram", "line_chart", "matrix_heatmap", "scatter"]
