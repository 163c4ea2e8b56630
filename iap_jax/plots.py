"""Pictures of results a person would rather look at than read."""
from __future__ import annotations

import os

import numpy as np

from iap_jax.labels import LabelEncoding


def write_confusion_matrices(confusions: dict[str, np.ndarray], encoding: LabelEncoding,
                             out_dir: str) -> list[str]:
    """One PNG per categorical head: rows are true classes, columns predictions, colour the
    share of each true class, numbers the counts. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
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
        ax.set_title(f"{head.name}: top-1 {accuracy:.3f} on {int(counts.sum())} labelled slices")
        for (row, col), value in np.ndenumerate(counts):
            if value:
                ax.text(col, row, f"{int(value)}", ha="center", va="center", fontsize=6,
                        color="white" if shares[row, col] > 0.5 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
        fig.tight_layout()
        path = os.path.join(out_dir, f"confusion_{head.name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
