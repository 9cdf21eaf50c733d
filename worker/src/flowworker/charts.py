"""The ``/workers`` page's charts: a count per minute of the last hour as an inline SVG bar chart.

Drawn on the server, as the rest of the page (it runs no script and loads nothing): this module
computes the geometry in the SVG's own units (its ``viewBox``), ``templates/charts.html`` writes
the elements. Each chart names its totals in its ``<title>`` (the accessible name) and in
``data-`` attributes, each bar its count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# the SVG's size in its own units; it scales to the width of the page
WIDTH = 480
HEIGHT = 150
# room left of the plot for the y axis labels, below it for the x axis labels, above it for its title
LEFT = 34
BOTTOM = 20
TOP = 18
# the share of a minute's slot its bar fills
BAR_FILL = 0.8
# the plot's baseline (the x axis)
BASELINE = HEIGHT - BOTTOM


@dataclass(frozen=True)
class Bar:
    minutes_ago: int
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    what: str
    minutes: int
    total: int
    peak: int
    bars: list[Bar]

    @property
    def label(self) -> str:
        """The chart in words: what a screen reader says, and a browser shows on hover."""
        return (
            f'{self.title}, the last {self.minutes} minutes: {self.total} {self.what} in all, '
            f'at most {self.peak} in a minute'
        )

    @property
    def scale(self) -> int:
        """The count the top of the plot stands for."""
        return max(self.peak, 1)


def minute_chart(id_: str, title: str, what: str, counts: Sequence[tuple[int, int]]) -> Chart:
    """The chart of ``counts``: (minutes ago, count) pairs, one per minute; a bar for each nonzero count."""
    minutes = len(counts)
    peak = max((count for _, count in counts), default=0)
    slot = (WIDTH - LEFT) / max(minutes, 1)
    unit = (BASELINE - TOP) / max(peak, 1)
    bars = [
        Bar(
            minutes_ago=ago,
            count=count,
            x=round(LEFT + (minutes - 1 - ago + (1 - BAR_FILL) / 2) * slot, 2),
            y=round(BASELINE - count * unit, 2),
            width=round(slot * BAR_FILL, 2),
            height=round(count * unit, 2),
        )
        for ago, count in counts
        if count
    ]
    return Chart(
        id=id_, title=title, what=what, minutes=minutes, total=sum(c for _, c in counts), peak=peak, bars=bars
    )
