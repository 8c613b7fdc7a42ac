"""Charts and figures drawn with matplotlib (Agg, no display): titles, axes, legends and colour bars.

Each function returns the figure as a uint8 RGB array, so callers write it
through the same atomic PNG writer as every other output. Image grids stay
in `image_grid` (PIL); what has axes or a colour scale is drawn here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  return plt


def _render(fig) -> np.ndarray:
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  _pyplot().close(fig)
  return rgb


def grouped_bars(table: dict[str, dict[str, tuple[float, float]]], metrics: Sequence[str], *, title: str,
                 ylabel: str, metric_names: dict[str, str] | None = None,
                 method_names: dict[str, str] | None = None) -> np.ndarray:
  """One group per metric, one bar per method: mean with a standard-error whisker, value printed on each bar.
  `table` is {method: {metric: (mean, standard error)}}."""
  plt = _pyplot()
  methods = list(table)
  fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=100)
  width = 0.8 / max(len(methods), 1)
  x = np.arange(len(metrics))
  for b, m in enumerate(methods):
    means = [table[m][k][0] for k in metrics]
    errs = [table[m][k][1] for k in metrics]
    bars = ax.bar(x - 0.4 + width * (b + 0.5), means, width * 0.92, yerr=errs, capsize=3,
                  label=(method_names or {}).get(m, m))
    ax.bar_label(bars, [f"{v:.3f}" for v in means], padding=2, fontsize=7)
  ax.set_xticks(x, [(metric_names or {}).get(k, k) for k in metrics])
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.axhline(0, color="black", linewidth=0.8)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  return _render(fig)


def heatmap_panels(maps: Sequence[np.ndarray], titles: Sequence[str], *, suptitle: str, colorbar: str | None,
                   vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
                   contours: Sequence[np.ndarray | None] | None = None, backgrounds: Sequence[np.ndarray] | None
                   = None, cols: int = 8) -> np.ndarray:
  """Square maps in a grid, each titled, one shared colour bar labelled `colorbar` (None: no colour bar).
  `contours` draws a bool map's outline (red) on its panel; `backgrounds` shows an image under each map."""
  plt = _pyplot()
  n = len(maps)
  cols = min(cols, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols + (1.2 if colorbar else 0.3), 1.8 * rows + 0.7),
                           dpi=100, squeeze=False)
  image = None
  for k, ax in enumerate(axes.flat):
    ax.set_axis_off()
    if k >= n:
      continue
    if backgrounds is not None:
      ax.imshow(backgrounds[k], extent=(0, 1, 1, 0))
      image = ax.imshow(maps[k], cmap=cmap, vmin=vmin, vmax=vmax, extent=(0, 1, 1, 0), alpha=0.6,
                        interpolation="nearest")
    else:
      image = ax.imshow(maps[k], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if contours is not None and contours[k] is not None and contours[k].any() and not contours[k].all():
      r = contours[k].shape[0]
      extent = (0, 1, 1, 0) if backgrounds is not None else (-0.5, r - 0.5, r - 0.5, -0.5)
      ax.contour(contours[k].astype(float), levels=[0.5], colors="red", linewidths=0.8, extent=extent,
                 origin="upper")
    ax.set_title(titles[k], fontsize=8)
  fig.suptitle(suptitle, fontsize=10)
  if colorbar and image is not None:
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=colorbar)
  else:
    fig.tight_layout()
  return _render(fig)


def overlay_figure(image: np.ndarray, heat: np.ndarray, *, title: str, colorbar: str, mask: np.ndarray | None = None,
                   side: np.ndarray | None = None, side_title: str = "") -> np.ndarray:
  """`heat` over `image` with a colour bar and the mask outlined in white; optionally a second panel `side`."""
  plt = _pyplot()
  panels = 2 if side is not None else 1
  fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + 0.8, 4.4), dpi=100, squeeze=False)
  ax = axes[0, 0]
  ax.imshow(image, extent=(0, 1, 1, 0))
  shown = ax.imshow(heat, cmap="magma", alpha=0.6, extent=(0, 1, 1, 0), vmin=0, vmax=max(float(np.max(heat)), 1e-6))
  if mask is not None and mask.any() and not mask.all():
    ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.0, extent=(0, 1, 1, 0),
               origin="upper")
  ax.set_title(title, fontsize=9)
  ax.set_axis_off()
  fig.colorbar(shown, ax=ax, shrink=0.8, label=colorbar)
  if side is not None:
    axes[0, 1].imshow(side, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0, 1].set_title(side_title, fontsize=9)
    axes[0, 1].set_xticks([])  # a frame, so a white mask stays visible on the white page
    axes[0, 1].set_yticks([])
  return _render(fig)


def titled(image: np.ndarray, title: str, caption: str = "") -> np.ndarray:
  """An image drawn elsewhere (pixel-exact), shown at its own size with a title above and a caption below."""
  plt = _pyplot()
  h, w = image.shape[:2]
  fig = plt.figure(figsize=(w / 100, h / 100 + 0.6), dpi=100)
  ax = fig.add_axes((0, 0.3 / (h / 100 + 0.6), 1, h / 100 / (h / 100 + 0.6)))
  ax.imshow(image, interpolation="nearest")
  ax.set_axis_off()
  fig.text(0.5, 1 - 0.05 / (h / 100 + 0.6), title, ha="center", va="top", fontsize=9)
  if caption:
    fig.text(0.5, 0.02, caption, ha="center", va="bottom", fontsize=7)
  return _render(fig)
