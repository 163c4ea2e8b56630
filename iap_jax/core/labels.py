"""Label encoding: raw header labels -> model targets and back.

Built from the train split's statistics only (iap_jax.io.dataset_info), so validation and
test values never shape the vocabularies or the transforms. The encoding is saved as
JSON inside every checkpoint: a predictor decodes with exactly what training used.

Categorical heads: a vocabulary of the values seen at least `min_count` times, plus an
"<other>" class for the rest (and for values never seen in training). For IAPs whose
spec says missing_is_class (the contrast agent), ABSENT and EMPTY are the classes
"<absent>" and "<empty>"; for every other IAP a missing label is masked.

Continuous heads: a transform ("log": log then z-score; "zscore": z-score; "raw": the
value unchanged, for the paper's loss on raw milliseconds).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from iap_jax.core.iaps import ALIASES, IAP_NAMES, SPECS, Kind, LabelState

OTHER = "<other>"
ABSENT = "<absent>"
EMPTY = "<empty>"
TRANSFORMS = ("log", "zscore", "raw")


@dataclasses.dataclass(frozen=True)
class HeadEncoding:
    """How one IAP becomes one output head."""

    name: str
    kind: str  # Kind value: "categorical" or "continuous"
    unit: str = ""
    classes: tuple[str, ...] = ()  # categorical only, "<other>" last when present
    transform: str = ""  # continuous only
    mean: float = 0.0
    std: float = 1.0
    aliases: tuple[tuple[str, str], ...] = ()  # categorical: (header value, class it joins)

    @property
    def categorical(self) -> bool:
        return self.kind == Kind.CATEGORICAL.value

    @property
    def size(self) -> int:
        return len(self.classes) if self.categorical else 1

    def canonical(self, value: str) -> str:
        """A header value as this head's classes spell it (through its alias table)."""
        for raw, alias in self.aliases:
            if raw == value:
                return alias
        return value

    def to_standard(self, x: np.ndarray) -> np.ndarray:
        """Real value -> regression target."""
        if self.transform == "log":
            x = np.log(np.maximum(x, 1e-12))
        return (x - self.mean) / self.std

    def from_standard(self, y):
        """Regression target -> real value (numpy or jax arrays)."""
        x = y * self.std + self.mean
        if self.transform == "log":
            x = np.exp(x) if isinstance(x, np.ndarray) else _jnp().exp(x)
        return x


def _jnp():
    import jax.numpy as jnp
    return jnp


def _vocabulary(name: str, split_stats: Mapping[str, Any], min_count: int,
                always_other: bool, aliases: Mapping[str, str]) -> tuple[str, ...]:
    spec = SPECS[name]
    iap_stats = split_stats["iaps"].get(name, {})
    counts: dict[str, int] = {}
    for value, n in iap_stats.get("value_counts", {}).items():
        counts[aliases.get(value, value)] = counts.get(aliases.get(value, value), 0) + n
    kept = [v for v, n in counts.items() if n >= min_count]
    rare = [v for v, n in counts.items() if n < min_count]
    if spec.numeric:
        kept.sort(key=float)
    else:
        kept.sort()
    classes = list(kept)
    if spec.missing_is_class:
        classes += [ABSENT, EMPTY]
    if rare or always_other or not classes:
        classes.append(OTHER)
    return tuple(classes)


def _continuous(name: str, split_stats: Mapping[str, Any], transform: str) -> HeadEncoding:
    spec = SPECS[name]
    if not spec.numeric:
        raise ValueError(f"{name}: only numeric IAPs can be continuous")
    if transform not in TRANSFORMS:
        raise ValueError(f"{name}: unknown transform {transform!r}; expected one of {TRANSFORMS}")
    numeric = split_stats["iaps"].get(name, {}).get("numeric") or {}
    if transform == "raw":
        mean, std = 0.0, 1.0
    elif not numeric.get("count"):
        raise ValueError(f"{name}: no numeric statistics in the train split to standardise with")
    elif transform == "log":
        mean, std = numeric["log_mean"], numeric["log_std"]
    else:
        mean, std = numeric["mean"], numeric["std"]
    std = float(std) if std and math.isfinite(std) and std > 1e-8 else 1.0
    return HeadEncoding(name, Kind.CONTINUOUS.value, unit=spec.unit, transform=transform,
                        mean=float(mean), std=std)


@dataclasses.dataclass(frozen=True)
class LabelEncoding:
    """All heads, in IAP schema order."""

    heads: tuple[HeadEncoding, ...]

    @classmethod
    def from_stats(cls, split_stats: Mapping[str, Any], *, iaps: Sequence[str] = IAP_NAMES,
                   kinds: Mapping[str, str] | None = None,
                   transforms: Mapping[str, str] | None = None,
                   min_count: int = 1, always_other: bool = False,
                   aliases: bool = False) -> "LabelEncoding":
        """From one split's statistics (the train split's: see features.load_iap_stats).

        kinds overrides an IAP's kind ("categorical"/"continuous"); transforms picks the
        continuous transform per IAP (default "log"); aliases=True joins the spellings of one
        scanner listed in iaps.ALIASES into one class."""
        if "iaps" not in split_stats:
            raise ValueError("split statistics have no 'iaps' entry; pass one split's stats, "
                             "e.g. load_iap_stats(dir)['train']")
        kinds = dict(kinds or {})
        transforms = dict(transforms or {})
        unknown = (set(iaps) | set(kinds) | set(transforms)) - set(SPECS)
        if unknown:
            raise ValueError(f"unknown IAP names {sorted(unknown)}; known: {list(IAP_NAMES)}")
        heads = []
        for name in IAP_NAMES:
            if name not in iaps:
                continue
            spec = SPECS[name]
            kind = Kind(kinds.get(name, spec.kind.value))
            if kind == Kind.CONTINUOUS:
                heads.append(_continuous(name, split_stats, transforms.get(name, "log")))
            else:
                table = dict(ALIASES.get(name, {})) if aliases else {}
                heads.append(HeadEncoding(name, Kind.CATEGORICAL.value, unit=spec.unit,
                                          classes=_vocabulary(name, split_stats, min_count,
                                                              always_other, table),
                                          aliases=tuple(sorted(table.items()))))
        return cls(tuple(heads))

    # --- shape ----------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    def head(self, name: str) -> HeadEncoding:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)

    def head_sizes(self) -> dict[str, int]:
        return {h.name: h.size for h in self.heads}

    # --- encode ---------------------------------------------------------------------

    def encode(self, labels: Mapping[str, Mapping[str, np.ndarray]]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A batch of raw label features (labels/<IAP>/{value,number,state}) ->
        (targets, masks): int32 class ids or float32 regression targets, and float32
        masks (1 = labelled). Masked targets are 0, never NaN."""
        targets, masks = {}, {}
        for head in self.heads:
            raw = labels[head.name]
            state = np.asarray(raw["state"])
            present = state == LabelState.PRESENT
            if head.categorical:
                targets[head.name], masks[head.name] = self._encode_classes(head, raw, state)
            else:
                number = np.asarray(raw["number"], np.float64)
                ok = present & np.isfinite(number) & ((number > 0) | (head.transform != "log"))
                target = np.where(ok, head.to_standard(np.where(ok, number, 1.0)), 0.0)
                targets[head.name] = target.astype(np.float32)
                masks[head.name] = ok.astype(np.float32)
        return targets, masks

    @staticmethod
    def _encode_classes(head: HeadEncoding, raw, state: np.ndarray):
        """Class ids and masks; each distinct value of the batch is canonicalised once (a
        batch holds a few dozen at most), so the cost per example is numpy's."""
        index = {c: i for i, c in enumerate(head.classes)}
        other = index.get(OTHER)
        flat_state = state.reshape(-1)
        ids = np.zeros(flat_state.shape, np.int32)
        mask = np.zeros(flat_state.shape, np.float32)
        present = flat_state == LabelState.PRESENT
        if present.any():
            values = np.asarray(raw["value"]).reshape(-1)[present]
            distinct, inverse = np.unique(values, return_inverse=True)
            labels = np.array([index.get(head.canonical(
                v.decode() if isinstance(v, bytes) else str(v)), other) for v in distinct],
                dtype=object)[inverse.reshape(-1)]
            known = np.array([label is not None for label in labels], bool)
            where = np.flatnonzero(present)[known]
            ids[where] = labels[known].astype(np.int32)
            mask[where] = 1.0
        for label_state, name in ((LabelState.ABSENT, ABSENT), (LabelState.EMPTY, EMPTY)):
            if name in index:
                chosen = flat_state == label_state
                ids[chosen] = index[name]
                mask[chosen] = 1.0
        return ids.reshape(state.shape), mask.reshape(state.shape)

    # --- decode ---------------------------------------------------------------------

    def decode(self, outputs: Mapping[str, np.ndarray], top_k: int = 2) -> dict[str, dict]:
        """Model outputs (logits / standardised values) -> per head:
        categorical {"value": top-1 class [B], "top_classes": [B, k], "top_probs": [B, k]};
        continuous {"value": real value [B], "unit": str}."""
        decoded = {}
        for head in self.heads:
            out = np.asarray(outputs[head.name], np.float64)
            if head.categorical:
                k = min(top_k, head.size)
                z = out - out.max(axis=-1, keepdims=True)
                probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
                order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
                classes = np.asarray(head.classes, dtype=object)[order]
                decoded[head.name] = {"value": classes[:, 0], "top_classes": classes,
                                      "top_probs": np.take_along_axis(probs, order, axis=-1)}
            else:
                decoded[head.name] = {"value": head.from_standard(out.reshape(out.shape[0], -1)[:, 0]),
                                      "unit": head.unit}
        return decoded

    # --- JSON -----------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"heads": [dataclasses.asdict(h) for h in self.heads]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> "LabelEncoding":
        if isinstance(data, str):
            data = json.loads(data)
        heads = []
        for h in data["heads"]:
            heads.append(HeadEncoding(**{**h, "classes": tuple(h.get("classes", ())),
                                         "aliases": tuple(tuple(p) for p in h.get("aliases", ()))}))
        return cls(tuple(heads))


def target_class(head, header) -> str | None:
    """The class a header value is scored against (as training scores it): the value when
    the vocabulary has it, else "<other>" where there is one; None where unlabelled."""
    if header is None:
        return None
    header = head.canonical(header)
    if header in head.classes:
        return header
    return OTHER if OTHER in head.classes else None


def class_indices(head, headers) -> np.ndarray:
    """Per header value, the index of the class it is scored against (-1: unlabelled)."""
    index = {c: i for i, c in enumerate(head.classes)}
    targets = (target_class(head, h) for h in headers)
    return np.array([-1 if t is None else index[t] for t in targets], np.int64)
