"""Unknown domain: an out-of-distribution score from the network's features, and the
probability that a slice or series is out of the training domain.

Fitted after training from the checkpoint alone (iap-fit, iap_jax.analysis.fit), on the train
split's features, by scanner model (ManufacturerModelName from the headers); what training
left out (its config's input.exclude) is not known. The network gives, per slice, its
pooled features and the texture statistics of its stem and of each stage (channel means and
standard deviations over the image: iap_jax.models.resnet). The scores (higher: further
from the training data):

  pooled    the smallest Mahalanobis distance of the pooled features to a known scanner
            model (one Gaussian per model, a shared covariance shrunk towards its diagonal)
  stages    the same distance on the stem's and every stage's statistics and on the pooled
            features, each divided by its median on the validation split, averaged
  per_model as stages, but each scanner model with a covariance of its own
  knn       the distance to the k-th nearest train slice, on every layer's features
            standardised and scaled to unit length (deep kNN, Sun et al. 2022)
  combined  stages and knn, each divided by its validation median, averaged

bench/ood.py --hold-out all compares them with every scanner model held out of training in
turn; DEFAULT_SCORE is the one its rule picks (the best worst case, then the most held-out
models caught: docs/evaluation.md).

A series' score is the median of its slices'. The validation split's slice and series
scores are kept: a score's p-value is (1 + the validation scores at least as high) /
(1 + their number), as FRD reports (Konz et al.); `unknown_probability` is 1 - p. A series
is out of the domain when its p-value is at most the false-unknown rate (default 5%: about
5% of known series are called unknown), a rate the user sets (iap-fit, iap-predict), never
a raw distance. iap-predict adds `ood_score` and `unknown_probability` to both tables and
`out_of_domain` to the series (the decision made once, in tables.series_table); an
out-of-domain series gets no header-QA flags and is `unknown` to iap-sort.

Stored beside the calibration in the training workdir: OOD_FILE (what was fitted, for which
checkpoint step, label encoding and parameters, and the validation scores) and ARRAYS_FILE
(the fitted arrays). Applied to a checkpoint of another encoding or parameters, it refuses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import jax
import numpy as np

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.io.sources import tfds_source
from iap_jax.io.storage import open_file, write_bytes_atomic, write_json_atomic
from iap_jax.prediction.calibration import load_fitted
from iap_jax.prediction.engine import Predictor, batches

OOD_FILE = "ood.json"
ARRAYS_FILE = "ood.npz"
GROUP_IAP = "ManufacturerModelName"
FORMAT = 2  # ood.json's layout; an older one is refitted, not guessed at
FALSE_UNKNOWN_RATE = 0.05
SCORES = ("pooled", "stages", "per_model", "knn", "combined")
DEFAULT_SCORE = "per_model"  # chosen by bench/ood.py --hold-out all (see above)
SHRINKAGE = 0.1
KNN_K = 10
KNN_BANK = 8192  # train slices the kNN score keeps (a random sample beyond that)
POOLED = "features"  # the name the model sows its pooled features under


def layer_names(features: dict) -> list[str]:
    """The stages in order, then the pooled features."""
    stages = sorted((k for k in features if k.startswith("stage")), key=lambda k: int(k[5:]))
    return stages + [POOLED]


# --- the pieces ---------------------------------------------------------------------------

def _precision(centred: np.ndarray, dof: int) -> np.ndarray:
    """The inverse of a covariance shrunk towards its diagonal (so that it inverts with few
    examples, and with fewer examples than dimensions)."""
    covariance = centred.T @ centred / max(dof, 1)
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.diag(np.diag(covariance))
    covariance += 1e-6 * max(np.trace(covariance), 1e-12) / len(covariance) * np.eye(len(covariance))
    return np.linalg.inv(covariance)


def fit_gaussians(features: np.ndarray, groups: np.ndarray,
                  shared: bool = True) -> tuple[np.ndarray, np.ndarray, list]:
    """(means [G, D], precision, group names) of features by group: one shared precision
    [D, D], or one per group [G, D, D]."""
    features = np.asarray(features, np.float64)
    names = sorted(set(groups.tolist()))
    means = np.stack([features[groups == g].mean(axis=0) for g in names])
    if shared:
        centred = features - means[np.searchsorted(names, groups)]
        return means, _precision(centred, len(features) - len(names)), names
    precisions = [_precision(features[groups == g] - m, int(np.sum(groups == g)) - 1)
                  for g, m in zip(names, means)]
    return means, np.stack(precisions), names


def scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The smallest Mahalanobis distance of each feature row to the group means, under the
    shared precision [D, D] or each group's own [G, D, D]."""
    features = np.asarray(features, np.float64)
    precision = np.asarray(precision, np.float64)
    squared = np.full(len(features), np.inf)
    for g, mean in enumerate(np.asarray(means, np.float64)):
        diff = features - mean
        p = precision[g] if precision.ndim == 3 else precision
        squared = np.minimum(squared, np.sum((diff @ p) * diff, axis=1))
    return np.sqrt(np.maximum(squared, 0.0))


def unit_rows(features: dict, names: list[str], centre: dict, scale: dict) -> np.ndarray:
    """Every layer standardised and scaled to unit length, side by side (length 1 in all)."""
    parts = []
    for name in names:
        z = (np.asarray(features[name], np.float32) - centre[name]) / scale[name]
        parts.append(z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12))
    return np.concatenate(parts, axis=1) / np.sqrt(len(names))


def kth_distance(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each query row to its k-th nearest bank row."""
    bank = np.asarray(bank, np.float32)
    bank_sq = np.sum(bank * bank, axis=1)
    k = min(k, len(bank))
    out = np.empty(len(queries))
    for start in range(0, len(queries), 512):
        q = np.asarray(queries[start:start + 512], np.float32)
        squared = np.sum(q * q, axis=1)[:, None] + bank_sq[None] - 2.0 * q @ bank.T
        out[start:start + 512] = np.sqrt(np.maximum(np.partition(squared, k - 1, axis=1)[:, k - 1], 0))
    return out


def p_values(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(1 + reference values >= each value) / (1 + len(reference)): the chance that a known
    slice or series scores at least this high (reference: sorted ascending)."""
    reference = np.asarray(reference, np.float64)
    at_least = len(reference) - np.searchsorted(reference, np.asarray(values, np.float64), "left")
    return (1.0 + at_least) / (1.0 + len(reference))


def threshold_for(reference: np.ndarray, rate: float) -> float:
    """The score above which a p-value (against the sorted reference) is at most rate: the
    out-of-domain threshold for a false-unknown rate, shown beside the scores."""
    n = len(reference)
    allowed = int(np.floor(rate * (n + 1) - 1 + 1e-9))  # reference values allowed above it
    if allowed < 0:
        return float("inf")
    return float(reference[n - allowed - 1]) if allowed < n else float("-inf")


# --- the scores ---------------------------------------------------------------------------

def _mahalanobis(arrays: dict, name: str, features: dict) -> np.ndarray:
    return scores(features[name], arrays[f"{name}/means"], arrays[f"{name}/precision"])


def _stages(arrays: dict, names: list[str], features: dict) -> np.ndarray:
    return np.mean([_mahalanobis(arrays, n, features) / arrays[f"{n}/median"] for n in names],
                   axis=0)


def _unit_rows(arrays: dict, names: list[str], features: dict) -> np.ndarray:
    return unit_rows(features, names, {n: arrays[f"{n}/centre"] for n in names},
                     {n: arrays[f"{n}/scale"] for n in names})


def _knn(arrays: dict, names: list[str], k: int, features: dict) -> np.ndarray:
    return kth_distance(_unit_rows(arrays, names, features), arrays["knn/bank"], k)


def _score(kind: str, arrays: dict, names: list[str], k: int, features: dict) -> np.ndarray:
    if kind == "pooled":
        return _mahalanobis(arrays, POOLED, features)
    if kind in ("stages", "per_model"):
        return _stages(arrays, names, features)
    if kind == "knn":
        return _knn(arrays, names, k, features)
    return 0.5 * (_stages(arrays, names, features) / arrays["combined/stages_median"]
                  + _knn(arrays, names, k, features) / arrays["combined/knn_median"])


def check_rate(rate: float, validation_series: int | None = None) -> None:
    """A false-unknown rate in (0, 1) that the validation series (where their number is
    given) can resolve: with n of them the smallest p-value is 1 / (n + 1), and a model that
    can never call a series unknown would pass every new scanner in silence."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the false-unknown rate must lie between 0 and 1, got {rate}")
    n = validation_series
    if n is not None and 1.0 / (n + 1) > rate:
        raise ValueError(f"{n} validation series cannot resolve a false-unknown rate of "
                         f"{rate:g} (the smallest p-value is 1/{n + 1}): use a rate of "
                         f"at least {1.0 / (n + 1):.3f}, or more validation data")


# --- the model ----------------------------------------------------------------------------

class OodModel:
    """A fitted score (`kind`, its arrays) with the validation scores its p-values use."""

    def __init__(self, data: dict, arrays: dict):
        self.data = data
        self.kind = data["score"]
        self.names = list(data["layers"])
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.rate = float(data["false_unknown_rate"])
        self.validation_slices = np.sort(self.arrays["validation_slice_scores"])
        self.validation_series = np.sort(self.arrays["validation_series_scores"])
        self.threshold = threshold_for(self.validation_series, self.rate)

    def with_rate(self, rate: float) -> "OodModel":
        check_rate(rate, len(self.validation_series))
        return OodModel({**self.data, "false_unknown_rate": float(rate)}, self.arrays)

    def score(self, features: dict) -> np.ndarray:
        """Slice scores from the engine's features ({layer name: [n, width]})."""
        missing = [n for n in self.names if n not in features]
        if missing:
            raise ValueError(f"{OOD_FILE} needs the features {missing}, which this model does not give")
        return _score(self.kind, self.arrays, self.names, int(self.data["k"]), features)

    def slice_unknown_probability(self, slice_scores: np.ndarray) -> np.ndarray:
        return 1.0 - p_values(slice_scores, self.validation_slices)

    def series_unknown_probability(self, series_scores: np.ndarray) -> np.ndarray:
        return 1.0 - p_values(series_scores, self.validation_series)

    def out_of_domain(self, series_scores: np.ndarray) -> np.ndarray:
        """The one decision: a series' p-value at most the false-unknown rate."""
        return p_values(series_scores, self.validation_series) <= self.rate + 1e-12

    def summary(self) -> dict:
        return {**self.data, "threshold": self.threshold}


def fit_model(kind: str, train: dict, train_groups: np.ndarray, validation: dict,
              validation_series: np.ndarray, rate: float = FALSE_UNKNOWN_RATE, seed: int = 0,
              k: int = KNN_K, bank_size: int = KNN_BANK) -> OodModel:
    """An OodModel of this kind from train features by group (the known scanner models) and
    validation features with their series keys (medians, p-values and the threshold)."""
    if kind not in SCORES:
        raise ValueError(f"OOD score must be one of {SCORES}, got {kind!r}")
    train_groups = np.asarray(train_groups).astype(str)
    names = layer_names(train)
    arrays: dict[str, np.ndarray] = {}
    model_names = [POOLED] if kind == "pooled" else names
    if kind in ("pooled", "stages", "per_model", "combined"):
        for name in model_names:
            means, precision, _ = fit_gaussians(train[name], train_groups,
                                                shared=kind != "per_model")
            arrays[f"{name}/means"] = means
            # Per model: [G, D, D] kept in float32 (a few MB); shared: float64 as before.
            arrays[f"{name}/precision"] = (precision.astype(np.float32) if precision.ndim == 3
                                           else precision)
    if kind in ("knn", "combined"):
        for name in names:
            x = np.asarray(train[name], np.float64)
            arrays[f"{name}/centre"] = x.mean(axis=0).astype(np.float32)
            arrays[f"{name}/scale"] = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
        rows = np.sort(np.random.default_rng(seed).permutation(len(train_groups))[:bank_size])
        arrays["knn/bank"] = _unit_rows(arrays, names, {n: np.asarray(train[n])[rows]
                                                        for n in names}).astype(np.float32)
    # Normalisers from validation (medians: the scale of a known slice's score).
    if kind in ("stages", "per_model", "combined"):
        for name in names:
            arrays[f"{name}/median"] = np.float64(np.median(_mahalanobis(arrays, name, validation)))
    if kind == "combined":
        arrays["combined/stages_median"] = np.float64(np.median(_stages(arrays, names, validation)))
        arrays["combined/knn_median"] = np.float64(np.median(_knn(arrays, names, k, validation)))
    slice_scores = _score(kind, arrays, model_names, k, validation)
    arrays["validation_slice_scores"] = np.sort(slice_scores)
    arrays["validation_series_scores"] = np.sort(series_medians(slice_scores, validation_series)[1])
    check_rate(rate, len(arrays["validation_series_scores"]))
    data = {"score": kind, "layers": model_names, "k": int(k), "false_unknown_rate": float(rate),
            "groups": sorted(set(train_groups.tolist())), "group_iap": GROUP_IAP,
            "train_slices": int(len(train_groups)),
            "features": int(sum(np.asarray(train[n]).shape[1] for n in model_names)),
            "validation_slices": int(len(slice_scores)),
            "validation_series": int(len(arrays["validation_series_scores"]))}
    return OodModel(data, arrays)


def series_medians(slice_scores: np.ndarray, series_keys) -> tuple[list, np.ndarray]:
    """(series keys, the median slice score of each)."""
    keys = np.asarray(series_keys)
    unique, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    values = np.asarray(slice_scores)[order]
    return list(unique), np.array([np.median(values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])


# --- stored beside the checkpoint ---------------------------------------------------------

def save(workdir: str, model: OodModel, step: int, checkpoint: str, encoding_sha256: str,
         fingerprint: str) -> dict:
    buffer = io.BytesIO()
    np.savez(buffer, **model.arrays)
    payload = buffer.getvalue()
    write_bytes_atomic(os.path.join(workdir, ARRAYS_FILE), payload)
    data = {**model.data, "format": FORMAT, "step": int(step), "checkpoint": checkpoint,
            "label_encoding_sha256": encoding_sha256, "checkpoint_fingerprint": fingerprint,
            "arrays": ARRAYS_FILE, "arrays_sha256": hashlib.sha256(payload).hexdigest(),
            "threshold": model.threshold}
    write_json_atomic(os.path.join(workdir, OOD_FILE), data)  # written last: marks it complete
    return data


def load_ood(workdir: str, step: int, encoding_sha256: str | None = None,
             fingerprint: str | None = None) -> OodModel | None:
    """The workdir's OOD model when it was fitted for this checkpoint step (else None);
    refuses one fitted for another label encoding or other parameters."""
    data = load_fitted(workdir, OOD_FILE, step)
    if data is None:
        return None
    path = os.path.join(workdir, OOD_FILE)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} predates this version's out-of-distribution scores; "
                         f"run iap-fit again")
    if encoding_sha256 and data["label_encoding_sha256"] != encoding_sha256:
        raise ValueError(f"{path} was fitted for another label encoding than the checkpoint's "
                         f"(step {step}); run iap-fit again")
    if fingerprint and data["checkpoint_fingerprint"] != fingerprint:
        raise ValueError(f"{path} was fitted on another checkpoint's parameters (step {step}, "
                         f"fitted on {data['checkpoint']}); run iap-fit again")
    with open_file(os.path.join(workdir, data["arrays"]), "rb") as f:
        payload = f.read()
    if hashlib.sha256(payload).hexdigest() != data["arrays_sha256"]:
        raise ValueError(f"{os.path.join(workdir, data['arrays'])} is not the one {path} was "
                         f"written with; run iap-fit again")
    with np.load(io.BytesIO(payload)) as arrays:
        return OodModel(data, dict(arrays))


# --- features of an input ------------------------------------------------------------------

@dataclasses.dataclass
class SliceFeatures:
    """The network's features of slices ({layer: [n, width]}) with each slice's group header
    value (its scanner model), series key and patient."""

    features: dict
    groups: np.ndarray
    series: np.ndarray
    patients: np.ndarray

    def __len__(self) -> int:
        return len(self.groups)

    def take(self, rows: np.ndarray) -> "SliceFeatures":
        return SliceFeatures({k: np.asarray(v)[rows] for k, v in self.features.items()},
                             self.groups[rows], self.series[rows], self.patients[rows])

    def known(self, exclude: dict) -> "SliceFeatures":
        """The slices whose group training saw (what input.exclude left out is not known)."""
        kept = np.ones(len(self), bool)
        for value in exclude.get(GROUP_IAP, []):
            kept &= self.groups != value
        return self.take(kept)


def source_features(predictor, source) -> SliceFeatures:
    """The features of every slice an input source gives."""
    features: dict[str, list] = {}
    groups, series, patients = [], [], []
    index = IAP_NAMES.index(GROUP_IAP)
    for item in batches(source, source.plan(), {}, predictor.batch_size, predictor.spec.stored_size):
        if item[0] != "batch":
            continue
        _, _, slices, images, scales, offsets = item
        _, layers = predictor(images, scales, offsets)
        for name, value in jax.device_get(layers).items():
            features.setdefault(name, []).append(np.asarray(value)[:len(slices)])
        groups += [(s.headers[index][1] or "<missing>") if s.headers is not None else "<missing>"
                   for s in slices]
        series += [s.series_key for s in slices]
        patients += [s.patient for s in slices]
    return SliceFeatures({k: np.concatenate(v) for k, v in features.items()},
                         np.asarray(groups, dtype=object), np.asarray(series, dtype=object),
                         np.asarray(patients, dtype=object))


def split_features(predictor, dataset_dir: str, split: str) -> SliceFeatures:
    return source_features(predictor, tfds_source(dataset_dir, split, predictor.spec))


def fit_known(kind: str, train: SliceFeatures, validation: SliceFeatures, exclude: dict,
              rate: float = FALSE_UNKNOWN_RATE) -> OodModel:
    """fit_model on the slices of the groups training saw."""
    train, validation = train.known(exclude), validation.known(exclude)
    return fit_model(kind, train.features, train.groups, validation.features, validation.series, rate)


def fit(workdir: str, dataset_dir: str | None = None, step="best", batch_size: int = 256,
        kind: str = DEFAULT_SCORE, rate: float = FALSE_UNKNOWN_RATE) -> dict:
    """Fits the OOD model of a checkpoint on its training data and stores it beside it."""
    check_rate(rate)  # before the features are computed
    predictor = Predictor.from_checkpoint(workdir, step, batch_size)
    dataset_dir = dataset_dir or predictor.config.get("dataset_dir")
    exclude = dict(predictor.config.get("input", {}).get("exclude") or {})
    train = split_features(predictor, dataset_dir, predictor.config.get("train_split", "train"))
    validation = split_features(predictor, dataset_dir,
                                predictor.config.get("eval_split", "validation"))
    model = fit_known(kind, train, validation, exclude, rate)
    return save(workdir, model, predictor.step, predictor.directory,
                predictor.encoding_sha256(), predictor.fingerprint)
