"""ipywidgets built on the plain plotting functions of :mod:`companion.plots`.

Each widget only wires a slider to a function that also works without widgets, so the
figure is testable headless and renders in static HTML.
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display

from companion.plots import plot_dpo_losses, plot_row_softmax


def temperature_slider(similarity, rows: int = 4, value: float = 0.07):
    """A log-scale slider on τ that redraws each row's softmax (InfoNCE's view of a batch)."""
    slider = widgets.FloatLogSlider(value=value, base=10, min=-2.5, max=0.5, step=0.05,
                                    description="τ", continuous_update=False)
    output = widgets.Output()

    def redraw(change=None):
        with output:
            output.clear_output(wait=True)
            fig = plot_row_softmax(similarity, slider.value, rows=rows)
            plt.show(fig)

    slider.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([slider, output])
    display(box)
    return box


def dpo_beta_slider(value: float = 0.1):
    """A log-scale slider on DPO's β that redraws every variant's loss against h."""
    slider = widgets.FloatLogSlider(value=value, base=10, min=-2, max=1, step=0.05,
                                    description="β", continuous_update=False)
    output = widgets.Output()

    def redraw(change=None):
        with output:
            output.clear_output(wait=True)
            plt.show(plot_dpo_losses(slider.value))

    slider.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([slider, output])
    display(box)
    return box
