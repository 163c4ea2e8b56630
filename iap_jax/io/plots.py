"""Pictures of results a person would rather look at than read (PNG, to a local path or a
URI)."""
from __future__ import annotations

import os

import numpy as np

from iap_jax.core.labels import LabelEncoding
from iap_jax.io.storage import makedirs, open_file


def _save(fig, path: str, dpi: int) -> None:
    """The figure as a PNG at `path` (its folder made), then closed."""
    makedirs(os.path.dirname(path) or ".")
    with open_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    _pyplot().close(fig)


def write_confusion_matrices(confusions: dict[str, np.ndarray], encoding: LabelEncoding,
                             out_dir: str, what: str = "labelled slices") -> list[str]:
    """One PNG per categorical head: rows are true classes, columns predictions, colour the
    share of each true class, numbers the counts. Returns the paths written."""
    plt = _pyplot()
    makedirs(out_dir)
    paths = []
    for head in encoding.heads:
        if not head.categorical or head.name not in confusions:
            continue
        counts = np.asarray(confusions[head.name], np.float64)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        size = max(4.0, 0.45 * head.size + 2.5)
        fig, ax = plt.subplots(figsize=(size + 1.5, size))
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(head.size), head.classes, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(head.size), head.classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        accuracy = np.trace(counts) / max(counts.sum(), 1.0)
        ax.set_title(f"{head.name}: top-1 {accuracy:.3f} on {int(counts.sum())} {what}")
        for (row, col), value in np.ndenumerate(counts):
            if value:
                ax.text(col, row, f"{int(value)}", ha="center", va="center", fontsize=6,
                        color="white" if shares[row, col] > 0.5 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
        fig.tight_layout()
        path = os.path.join(out_dir, f"confusion_{head.name}.png")
        _save(fig, path, dpi=110)
        paths.append(path)
    return paths


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_scatter(true: np.ndarray, predicted: np.ndarray, name: str, unit: str, path: str,
                  title: str = "") -> str:
    """Predicted against true values of a continuous IAP, with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(true, predicted, s=6, alpha=0.4, color="tab:blue", edgecolors="none")
    finite = np.concatenate([true, predicted])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        pad = 0.05 * (high - low or 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.4", lw=1, ls="--")
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"header {name} ({unit})")
    ax.set_ylabel(f"predicted {name} ({unit})")
    ax.set_title(title or name, fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=110)
    return path


LINE_MIN_SHARE = 0.01


def write_reliability(curves: dict[str, tuple], name: str, path: str) -> str:
    """Reliability diagram: accuracy per confidence bin against the diagonal, one line per
    curve label (e.g. before / after calibration); curves: label -> (confidence, accuracy,
    counts, ece)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--", label="perfect")
    for (label, (confidence, accuracy, counts, ece)), colour in zip(curves.items(),
                                                                      ("tab:red", "tab:blue")):
        filled = counts > 0
        # A bin's weight in the ECE is its share of the slices: the marker's area shows it.
        # The line joins the bins of at least LINE_MIN_SHARE only: a bin of a slice or two
        # reads 0 or 1 and would swing it across the plot.
        share = counts / max(counts.sum(), 1)
        steady = share >= LINE_MIN_SHARE
        ax.plot(confidence[steady], accuracy[steady], lw=1, color=colour,
                label=f"{label} (ECE {ece:.3f})")
        ax.scatter(confidence[filled], accuracy[filled], s=4 + 300 * share[filled], color=colour,
                   alpha=0.6, linewidths=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.text(0.98, 0.02, f"marker area: share of slices; line: bins of {LINE_MIN_SHARE:.0%} or more",
            ha="right", va="bottom", fontsize=7, color="0.4", transform=ax.transAxes)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}: reliability", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi=110)
    return path


def write_thumbnail(image: np.ndarray, path: str, size: float = 2.0) -> str:
    """A grayscale slice, windowed to its 1st-99th percentiles, without axes."""
    plt = _pyplot()
    image = np.asarray(image, np.float32)
    low, high = np.percentile(image, (1, 99))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
    ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1)
    _save(fig, path, dpi=80)
    return path
