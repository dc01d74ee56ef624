"""A loss curve that redraws itself while training runs in a notebook.

`LossPlot` is a `gemma_lab.training.train` callback: it collects the
training loss of every step (and the held-out loss when measured) and
redraws one matplotlib figure in place every few steps. Outside a notebook
it only collects the numbers.
"""

from __future__ import annotations

import matplotlib.pyplot as plt


class LossPlot:
    """Live plot of training (and held-out) loss against the step.

    Args:
        every: redraw after this many steps.
        title: figure title.

    >>> plot = LossPlot(every=10)
    >>> plot(1, 2.5, None)
    >>> plot.losses
    [2.5]
    """

    def __init__(self, every: int = 5, title: str = "LoRA training loss"):
        if every <= 0:
            raise ValueError(f"every must be > 0, got {every}")
        self.every, self.title = every, title
        self.steps, self.losses = [], []
        self.eval_steps, self.eval_losses = [], []
        self._handle = None
        self._figure = None

    def __call__(self, step: int, loss: float, eval_loss: float | None):
        self.steps.append(step)
        self.losses.append(loss)
        if eval_loss is not None:
            self.eval_steps.append(step)
            self.eval_losses.append(eval_loss)
        if step % self.every == 0:
            self.draw()

    def draw(self):
        """Redraws the figure (in place when running under IPython)."""
        if self._figure is None:
            self._figure, _ = plt.subplots(figsize=(6, 3.5))
            plt.close(self._figure)
        ax = self._figure.axes[0]
        ax.clear()
        ax.plot(self.steps, self.losses, label="train")
        if self.eval_steps:
            ax.plot(self.eval_steps, self.eval_losses, "o-", label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (response tokens)")
        ax.set_title(self.title)
        ax.legend()
        self._show()
        return self._figure

    def _show(self):
        try:
            from IPython.display import display
        except ImportError:
            return
        if self._handle is None:
            self._handle = display(self._figure, display_id=True)
        elif self._handle is not None:
            self._handle.update(self._figure)
