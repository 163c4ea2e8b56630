"""Calibrated confidence: one calibrator per categorical head, and the calibration error.

A calibrator maps a head's logits z to calibrated logits before the softmax. Three families:

  temperature   z / T                     T > 1 softens an over-confident head, T < 1 sharpens
                                          an under-confident one; the top-1 class never changes.
  bcts          z / T + b                 bias-corrected temperature scaling: a per-class bias b
                                          also moves probability between classes the head over-
                                          or under-predicts.
  vector        z * exp(d) / T + b        vector scaling: a per-class scale and bias.

The temperature is fitted to the top-1 probability (top_label_loss: the binary cross-entropy
of the top-1 probability against whether the top-1 class is right), which is what top-label
ECE scores; bcts and vector to the mean negative log-likelihood plus an L2 penalty on b and d,
which keeps a class absent from the fitting data at a finite bias and the per-class terms
small where the data does not ask for them. A bias or per-class scale can change the top-1
class: the predicted class is always the argmax of the calibrated probabilities, and accuracy
is scored on it.

The calibrators are fitted on the validation split's predictions (iap-fit)
and kept in the training workdir as CALIBRATION_FILE, for the checkpoint step they were fitted
for; iap-predict applies them when the step matches. Each head's family is chosen by
patient-grouped K-fold cross-validation on the fitting data (cross_validate, select_family):
the temperature unless a richer family is significantly better. A file that holds only
"temperatures" (written before the other families existed) still loads, as temperature
calibrators (head_calibrators).

Expected calibration error (top-label, equal-width bins): the slices are binned by their top-1
probability, and ECE = sum over bins of (share of slices) * |accuracy - mean confidence|.
On a few hundred patients it is far from zero even for a perfectly calibrated model:
ece_noise_floor simulates that, and weighted_ece scores bootstrap resamples of patients.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from iap_jax.core.labels import LabelEncoding
from iap_jax.io.storage import read_json, write_json_atomic

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15
FAMILIES = ("temperature", "bcts", "vector")
# Per-class terms' L2 penalty, in nats of mean NLL per unit squared parameter.
L2 = 1e-3
CV_FOLDS = 5
CV_REPEATS = 3
CV_RESAMPLES = 1000
CV_SEED = 0
# A richer family must lower the out-of-fold ECE by at least this, as well as significantly.
CV_MIN_GAIN = 1e-3
TEMPERATURE_BOUNDS = (0.05, 20.0)
LOG_SCALE_BOUND = 3.0


# --- the calibrators ----------------------------------------------------------------------

def check_family(name: str) -> None:
    """Raises ValueError unless `name` is one of FAMILIES."""
    if name not in FAMILIES:
        raise ValueError(f"calibration family {name!r}: not one of {', '.join(FAMILIES)}")


@dataclasses.dataclass(frozen=True)
class HeadCalibration:
    """One head's calibrator (see the module docstring); the identity by default."""
    family: str = "temperature"
    temperature: float = 1.0
    bias: tuple[float, ...] = ()       # bcts, vector: per class
    log_scale: tuple[float, ...] = ()  # vector: per class, d in z * exp(d) / T

    def __post_init__(self):
        check_family(self.family)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"family": self.family, "temperature": float(self.temperature)}
        if self.family in ("bcts", "vector"):
            data["bias"] = [float(b) for b in self.bias]
        if self.family == "vector":
            data["log_scale"] = [float(d) for d in self.log_scale]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "HeadCalibration":
        return cls(str(data.get("family", "temperature")), float(data.get("temperature", 1.0)),
                   tuple(float(b) for b in data.get("bias", ())),
                   tuple(float(d) for d in data.get("log_scale", ())))

    def describe(self) -> str:
        return f"{self.family} T={self.temperature:.2f}"


IDENTITY = HeadCalibration()


def calibrated_logits(logits: np.ndarray, calibration: HeadCalibration | float | None = None) -> np.ndarray:
    """[..., classes] logits through a head's calibrator (a float: a temperature; None: as
    they are). The one place a calibrator is applied: probabilities, the predictor's tables
    and the report all come through here."""
    if calibration is None:
        calibration = IDENTITY
    elif not isinstance(calibration, HeadCalibration):
        calibration = HeadCalibration(temperature=float(calibration))
    z = np.asarray(logits, np.float64) / float(calibration.temperature)
    size = z.shape[-1]
    if calibration.log_scale:
        z = z * np.exp(_per_class(calibration.log_scale, size))
    if calibration.bias:
        z = z + _per_class(calibration.bias, size)
    return z


def probabilities(logits: np.ndarray, calibration: HeadCalibration | float | None = None) -> np.ndarray:
    """[..., classes] calibrated probabilities of a head's logits."""
    return softmax(calibrated_logits(logits, calibration))


def _per_class(values: Sequence[float], size: int) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.shape != (size,):
        raise ValueError(f"calibrator has {values.size} per-class terms for a head of {size} classes")
    return values


def _log_probs(z: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis."""
    from scipy.special import log_softmax

    return log_softmax(np.asarray(z, np.float64), axis=-1)


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(_log_probs(logits))


def head_calibrators(data: Mapping[str, Any] | None, encoding: LabelEncoding | None = None,
                     path: str | None = None) -> dict[str, HeadCalibration]:
    """Per head, the calibrator of a calibration.json's contents (None: no calibration). A file
    with only "temperatures" (the format before the other families) gives temperature ones.
    With the label encoding, each calibrator must belong to one of its
    categorical heads and have one per-class term per class: a file that does not match
    raises ValueError naming `path` and the head, at load rather than mid-run."""
    if not data:
        return {}
    where = f"{path}: " if path else ""
    if "calibrators" in data:
        items = data["calibrators"].items()
    else:
        items = ((name, {"temperature": t}) for name, t in (data.get("temperatures") or {}).items())
    heads = {h.name: h for h in encoding.heads if h.categorical} if encoding is not None else None
    calibrators = {}
    for name, c in items:
        try:
            calibrators[name] = HeadCalibration.from_json(c)
            if heads is not None:
                if name not in heads:
                    raise ValueError("no categorical head of that name in the label encoding")
                # Applied once to a row of the head's size: the same checks as every use.
                calibrated_logits(np.zeros((1, heads[name].size)), calibrators[name])
        except ValueError as err:
            raise ValueError(f"{where}{name}: {err}") from err
    return calibrators


# --- fitting ------------------------------------------------------------------------------

def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            calibration: HeadCalibration | float | None = None,
                            prior: float = 0.0) -> float:
    """Mean NLL of `labels` (class indices) under the calibrated logits. prior: that many
    pseudo-slices of a label spread evenly over the classes (_targets)."""
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return math.nan
    log_p = _log_probs(calibrated_logits(logits, calibration))
    return float(-np.sum(_targets(labels, log_p.shape[1], prior) * log_p) / len(labels))


def _targets(labels: np.ndarray, size: int, prior: float) -> np.ndarray:
    """[n, size] one-hot labels, each mixed with `prior / n` of an even spread over the
    classes: the mean NLL against them is that of the n slices plus `prior` pseudo-slices of
    a uniform label (each scored at every real slice's logits, on average)."""
    n = len(labels)
    targets = np.zeros((n, size))
    targets[np.arange(n), labels] = 1.0
    smoothing = prior / n if n else 0.0
    return (targets + smoothing / size) / (1.0 + smoothing)


def top_label_loss(logits: np.ndarray, labels: np.ndarray,
                   calibration: HeadCalibration | float | None = None, prior: float = 0.0) -> float:
    """Mean binary cross-entropy of the top-1 probability against whether the top-1 class is
    right: the proper score of exactly what top-label ECE measures. prior: that many
    pseudo-slices of each outcome (right, wrong), each scored at the mean over the slices."""
    from scipy.special import logsumexp

    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return math.nan
    log_p = _log_probs(calibrated_logits(logits, calibration))
    rows, top = np.arange(len(log_p)), log_p.argmax(axis=-1)
    log_top = log_p[rows, top]               # log P(top-1)
    log_p[rows, top] = -np.inf
    log_not_top = logsumexp(log_p, axis=-1)  # log (1 - P(top-1)), stably
    correct = top == labels
    total = -np.sum(np.where(correct, log_top, log_not_top))
    if prior:
        total -= prior * (np.mean(log_top) + np.mean(log_not_top))
    return float(total / (len(labels) + 2 * prior))


# Every fit sees pseudo-slices beside the real ones: the top-label temperature one of each
# outcome (Laplace's rule of succession), the NLL fits one of a uniform label. A head right on
# all n fitting slices is then fitted to a top-1 probability of about (n + 1) / (n + 2), where
# without them its temperature runs to the bound and it is certain (probabilities of 1.0,
# however wrong it is later; and the cross-validation would then prefer whichever family is
# most certain). With errors to fit, they move a fit by about 1/n.
PRIOR_SLICES = 1.0
TEMPERATURE_OBJECTIVES = {
    "top_label": lambda logits, labels, t: top_label_loss(logits, labels, t, prior=PRIOR_SLICES),
    "nll": lambda logits, labels, t: negative_log_likelihood(logits, labels, t, prior=PRIOR_SLICES)}
# Measured on the demo (fitted on one random half of its validation and test patients, scored
# on the other, 30 times): the top-label temperature is softer than the NLL one on every head
# with a top-1 below 0.9, lowers the mean ECE of the two least accurate heads (top-1 about
# 0.3) from 0.072 and 0.057 to 0.049 and 0.040, and leaves the others within 0.003.
TEMPERATURE_OBJECTIVE = "top_label"


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    objective: str = TEMPERATURE_OBJECTIVE) -> float:
    """The temperature in TEMPERATURE_BOUNDS minimising `objective` on `labels` (class
    indices): "top_label" (top_label_loss with PRIOR_SLICES, the default) calibrates the
    top-1 probability, what top-label ECE scores; "nll" the whole distribution. They differ where a head's
    miscalibration differs between its top class and the rest: the NLL temperature then
    leaves the top-1 probability over-confident (seen on low-accuracy heads)."""
    from scipy.optimize import minimize_scalar

    loss = TEMPERATURE_OBJECTIVES[objective]
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: loss(logits, labels, math.exp(log_t)),
                             bounds=tuple(math.log(b) for b in TEMPERATURE_BOUNDS),
                             method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def fit(logits: np.ndarray, labels: np.ndarray, family: str = "temperature",
        l2: float = L2) -> HeadCalibration:
    """The calibrator of `family` fitted to `labels` (class indices): a temperature by
    fit_temperature (its default objective); bcts and vector by the mean NLL (with
    PRIOR_SLICES) plus l2 * (|b|^2 + |d|^2), by L-BFGS with the analytic gradient, from the
    NLL temperature."""
    from scipy.optimize import minimize

    check_family(family)
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    n, size = logits.shape if logits.ndim == 2 else (0, 0)
    with_bias, with_scale = family in ("bcts", "vector"), family == "vector"
    if family == "temperature" or n == 0:
        return HeadCalibration(family, fit_temperature(logits, labels) if n else 1.0,
                               (0.0,) * size if with_bias else (), (0.0,) * size if with_scale else ())
    targets = _targets(labels, size, PRIOR_SLICES)

    def unpack(theta):
        log_t = theta[0]
        bias = theta[1:1 + size] if with_bias else np.zeros(size)
        log_scale = theta[1 + size:] if with_scale else np.zeros(size)
        return log_t, bias, log_scale

    def objective_and_gradient(theta):
        log_t, bias, log_scale = unpack(theta)
        scaled = logits * np.exp(log_scale - log_t)
        log_p = _log_probs(scaled + bias)
        loss = -float(np.sum(log_p * targets)) / n
        g = (np.exp(log_p) - targets) / n  # d loss / d calibrated logit
        grad = [np.array([-np.sum(g * scaled)])]
        if with_bias:
            loss += l2 * float(bias @ bias)
            grad.append(g.sum(axis=0) + 2 * l2 * bias)
        if with_scale:
            loss += l2 * float(log_scale @ log_scale)
            grad.append((g * scaled).sum(axis=0) + 2 * l2 * log_scale)
        return loss, np.concatenate(grad)

    bounds = [tuple(math.log(b) for b in TEMPERATURE_BOUNDS)] + [(None, None)] * (size * with_bias) \
        + [(-LOG_SCALE_BOUND, LOG_SCALE_BOUND)] * (size * with_scale)
    # From the NLL temperature alone, so that no family fits worse than it.
    start = np.zeros(1 + size * (with_bias + with_scale))
    start[0] = math.log(fit_temperature(logits, labels, "nll"))
    result = minimize(objective_and_gradient, start, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": 500, "gtol": 1e-7, "ftol": 1e-10})
    log_t, bias, log_scale = unpack(result.x)
    bias = bias - bias.mean()  # the softmax ignores a common shift
    return HeadCalibration(family, float(math.exp(log_t)), tuple(float(b) for b in bias),
                           tuple(float(d) for d in log_scale) if with_scale else ())


def group_folds(groups: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Per slice, its fold: the groups (patients) shuffled and dealt into `folds` folds."""
    groups = np.asarray(groups, np.int64)
    unique = np.unique(groups)
    fold_of_group = np.empty(groups.max() + 1 if len(groups) else 0, np.int64)
    fold_of_group[rng.permutation(unique)] = np.arange(len(unique)) % folds
    return fold_of_group[groups]


def cross_validate(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                   families: Sequence[str] = FAMILIES, folds: int = CV_FOLDS,
                   repeats: int = CV_REPEATS, seed: int = CV_SEED,
                   resamples: int = CV_RESAMPLES) -> dict[str, dict[str, Any]]:
    """Per family: the ECE and NLL of its out-of-fold probabilities (each fold's slices
    calibrated by a fit on the other folds; folds are whole groups, i.e. patients), the mean
    over `repeats` shuffles of the groups into `folds` folds; and for each family but the
    first, "ece_difference": the 95% interval of its out-of-fold ECE minus the first
    family's, by a paired bootstrap over the groups (the same resampled patients for both)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    families = list(families)
    rng = np.random.default_rng(seed)
    groups, boot = group_bootstrap(groups, resamples, rng)
    folds = min(folds, boot.shape[1])
    scores = {f: {"ece": [], "nll": [], "boot": []} for f in families}
    for _ in range(repeats if folds >= 2 else 0):
        fold = group_folds(groups, folds, rng)
        out = {f: np.zeros_like(logits) for f in families}
        for k in range(folds):
            train, held = fold != k, fold == k
            for f in families:
                out[f][held] = calibrated_logits(logits[held], fit(logits[train], labels[train], f))
        for f in families:
            p = softmax(out[f])
            confidence, correct = p.max(axis=1), p.argmax(axis=1) == labels
            scores[f]["ece"].append(expected_calibration_error(confidence, correct))
            scores[f]["nll"].append(negative_log_likelihood(out[f], labels))
            scores[f]["boot"].append(weighted_ece(confidence, correct, groups, boot))
    result: dict[str, dict[str, Any]] = {}
    for f in families:
        s = scores[f]
        result[f] = {k: float(np.mean(s[k])) if s[k] else math.nan for k in ("ece", "nll")}
        if f != families[0] and s["boot"]:
            difference = np.mean(s["boot"], axis=0) - np.mean(scores[families[0]]["boot"], axis=0)
            difference = difference[np.isfinite(difference)]
            result[f]["ece_difference"] = ([float(x) for x in np.percentile(difference, (2.5, 97.5))]
                                           if len(difference) else [math.nan, math.nan])
    return result


def select_family(scores: Mapping[str, Mapping[str, Any]]) -> str:
    """The family cross_validate's scores favour: the first one (the simplest, temperature),
    unless another has a lower out-of-fold ECE with the whole 95% interval of its difference
    below -CV_MIN_GAIN; of several such, the lowest ECE. With a few hundred patients, a per-class
    bias fits the fitting split's class frequencies as much as the model's miscalibration:
    a richer family must beat the temperature by more than that noise."""
    names = [f for f in scores if math.isfinite(scores[f]["ece"])]
    if not names:
        return next(iter(scores), "temperature")
    better = [f for f in names[1:] if scores[f].get("ece_difference", [math.nan] * 2)[1] < -CV_MIN_GAIN]
    return min(better, key=lambda f: scores[f]["ece"]) if better else names[0]


def bootstrap_weights(groups: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, groups]: how often each group (patient) is drawn, with replacement, in
    each bootstrap resample."""
    return rng.multinomial(groups, np.full(groups, 1.0 / groups), size=resamples).astype(np.float64)


def group_bootstrap(groups: np.ndarray, resamples: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(per slice, its group numbered from 0 in sorted order; bootstrap_weights over those
    groups, [resamples, groups]): the resampling of patients that weighted_ece takes."""
    _, index = np.unique(np.asarray(groups, np.int64), return_inverse=True)
    count = int(index.max()) + 1 if len(index) else 0
    return index, bootstrap_weights(count, resamples, rng) if count else np.zeros((resamples, 0))


# --- calibration error --------------------------------------------------------------------

def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((np.asarray(confidence, np.float64) * bins).astype(int), bins - 1)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width bin of confidence: (mean confidence, accuracy, count); empty bins
    have NaN means and count 0. A confidence of exactly 1 falls in the last bin."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    index = _bin_index(confidence, bins)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=bins) / counts
        accuracy = np.bincount(index, correct, minlength=bins) / counts
    return mean_confidence, accuracy, counts


def _ece_from_bin_sums(gaps: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ECE from per-bin sums of (correct - confidence) and per-bin slice counts (bins on the
    last axis): the sum over bins of |sum of gaps| = count * |accuracy - mean confidence|,
    over the number of slices. The one place the bins are combined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(gaps).sum(axis=-1) / np.sum(counts, axis=-1)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Top-label ECE of top-1 probabilities `confidence` and hits `correct` (0/1); NaN for
    no slices."""
    one_group = np.zeros(len(confidence), np.int64)
    return float(weighted_ece(confidence, correct, one_group, np.ones((1, 1)), bins)[0])


def weighted_ece(confidence: np.ndarray, correct: np.ndarray, groups: np.ndarray,
                 group_weights: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """ECE with each slice counted as often as its group's weight, for every row of
    `group_weights` [resamples, groups] (a bootstrap over patients: multinomial counts)."""
    confidence = np.asarray(confidence, np.float64)
    groups = np.asarray(groups, np.int64)
    group_weights = np.atleast_2d(np.asarray(group_weights, np.float64))
    count = group_weights.shape[1]
    cell = groups * bins + _bin_index(confidence, bins)
    counts = np.bincount(cell, minlength=count * bins).reshape(count, bins)
    gaps = np.bincount(cell, np.asarray(correct, np.float64) - confidence,
                       minlength=count * bins).reshape(count, bins)
    return _ece_from_bin_sums(group_weights @ gaps, group_weights @ counts)


def ece_noise_floor(probs: np.ndarray, groups: np.ndarray, draws: int, rng: np.random.Generator,
                    bins: int = ECE_BINS) -> np.ndarray:
    """ECE of `draws` label sets drawn from these (taken as perfectly calibrated) probabilities:
    the ECE that sampling alone gives on data this size. One uniform number per group (series)
    is shared by its slices, each slice's label being where it falls in that slice's
    cumulative probabilities: every slice's label follows its own probabilities, and slices of
    a group share their label where their probabilities agree, as slices of a series do."""
    probs = np.asarray(probs, np.float64)
    groups = np.asarray(groups, np.int64)
    if not len(probs) or draws <= 0:
        return np.array([])
    top = probs.argmax(axis=1)
    confidence = probs[np.arange(len(probs)), top]
    upper = np.cumsum(probs, axis=1)[np.arange(len(probs)), top]
    lower = upper - confidence
    index = _bin_index(confidence, bins)
    one_hot = np.zeros((len(probs), bins))
    one_hot[np.arange(len(probs)), index] = 1.0
    result = []
    chunk = max(1, 4_000_000 // len(probs))
    for start in range(0, draws, chunk):
        u = rng.random((min(chunk, draws - start), groups.max() + 1))[:, groups]
        correct = (u >= lower) & (u < upper)
        result.append(_ece_from_bin_sums((correct - confidence) @ one_hot, one_hot.sum(axis=0)))
    return np.concatenate(result)


# --- storage ------------------------------------------------------------------------------

def save_calibration(workdir: str, data: Mapping[str, Any]) -> str:
    path = os.path.join(workdir, CALIBRATION_FILE)
    write_json_atomic(path, dict(data), sort_keys=True)
    return path


def load_fitted(workdir: str, filename: str, step: int) -> dict | None:
    """A JSON fitted after training and kept in the workdir (the calibration, the OOD model),
    when it was fitted for this checkpoint step; else None."""
    path = os.path.join(workdir, filename)
    if not epath.Path(path).exists():
        return None
    data = read_json(path)
    return data if int(data.get("step", -1)) == int(step) else None


def load_calibration(workdir: str, step: int) -> dict | None:
    """The workdir's calibration when it was fitted for this checkpoint step, else None."""
    return load_fitted(workdir, CALIBRATION_FILE, step)
