"""The predictor's tables: per slice and per series, as Parquet (pyarrow).

slices.parquet, one row per slice:
  series_key, slice_index, patient, phase   (what iap-prep writes for the same slice with
                     the same salt), file_key, frame (the salted key of the input file or
                     shard, iap_jax.io.local_paths, and where in it: frame, tile, plane, record)
  categorical IAP:   <IAP> (top-1 class), <IAP>_prob, <IAP>_topk, <IAP>_topk_prob (through
                     the head's calibrator, iap_jax.prediction.calibration, when the workdir has a
                     calibration for the step; the top-1 class is the calibrated argmax),
                     <IAP>_logits (the head's raw outputs, in vocabulary order)
  continuous IAP:    <IAP> (real units, e.g. ms)
  with headers:      <IAP>_header (the header's canonical value; "<absent>" / "<empty>" for
                     an IAP whose missing value is a class; null where missing or invalid)
With an out-of-distribution model (iap_jax.prediction.ood) for the step: per slice its
ood_score and unknown_probability (1 - its p-value among the validation slices' scores); per
series the median score, its unknown_probability (among the validation series' scores) and
`out_of_domain` (that p-value at most the model's false-unknown rate: the series' predictions
are outside the model's domain and not to be trusted, however confident their
probabilities read); slices.parquet carries its series' `out_of_domain` too.
series.parquet, one row per series (series_key, patient, phase, num_slices, then per IAP):
  categorical:       <IAP> (argmax of the mean of slice probabilities), <IAP>_prob (that
                     mean), <IAP>_agreement (share of slices whose top-1 is the series answer)
  continuous:        <IAP> (median of the slices)
  with headers:      <IAP>_header (the commonest slice header value), and with a calibration
                     that chose QA thresholds: qa_flags (the IAPs whose header a prediction is
                     confident is wrong: 1 - P(header's class) at least the IAP's threshold;
                     "missing_header:<IAP>" where a confident prediction fills a missing header)
                     and qa_note (null where QA was applied; why not where it was not: a series
                     out of the model's domain gets no flags)
The schema metadata records the checkpoint, its step, the label encoding (vocabularies), the
pixel spec and the calibration applied (null for none).

Tables are read and written at local paths by pyarrow itself, and at URIs (gs://...)
through etils.epath file objects (read_table, read_schema and the writers below), so that
every path of the project goes through one file system layer.
"""
from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iap_jax.core import metrics
from iap_jax.core.iaps import IAP_NAMES, SPECS, LabelState
from iap_jax.core.labels import ABSENT, EMPTY, LabelEncoding, target_class
from iap_jax.io.storage import is_remote, open_file, replacing
from iap_jax.prediction import calibration as calibration_lib
from iap_jax.prediction.header_qa import OUT_OF_DOMAIN_NOTE, commonest, header_probability, qa_flags

KEY_COLUMNS = ("series_key", "slice_index", "patient", "phase", "file_key", "frame")


def _key_fields() -> list[pa.Field]:
    return [pa.field("series_key", pa.string()), pa.field("slice_index", pa.int32()),
            pa.field("patient", pa.string()), pa.field("phase", pa.int32()),
            pa.field("file_key", pa.string()), pa.field("frame", pa.int32())]


def slice_schema(encoding: LabelEncoding, has_headers: bool,
                 metadata: Mapping[str, Any] | None = None, ood: bool = False) -> pa.Schema:
    fields = _key_fields() + ([pa.field("ood_score", pa.float32()),
                               pa.field("unknown_probability", pa.float32())] if ood else [])
    for head in encoding.heads:
        if head.categorical:
            fields += [pa.field(head.name, pa.string()), pa.field(f"{head.name}_prob", pa.float32()),
                       pa.field(f"{head.name}_topk", pa.list_(pa.string())),
                       pa.field(f"{head.name}_topk_prob", pa.list_(pa.float32())),
                       pa.field(f"{head.name}_logits", pa.list_(pa.float32()))]
            header_type = pa.string()
        else:
            fields.append(pa.field(head.name, pa.float64()))
            header_type = pa.float64()
        if has_headers:
            fields.append(pa.field(f"{head.name}_header", header_type))
    return pa.schema(fields, metadata=_encode_metadata(metadata))


def _encode_metadata(metadata: Mapping[str, Any] | None) -> dict[bytes, bytes] | None:
    if not metadata:
        return None
    return {k.encode(): json.dumps(v, sort_keys=True).encode() for k, v in metadata.items()}


class _Stream(io.RawIOBase):
    """An epath file object (for gs://, a tf.io.gfile.GFile) as the file pyarrow reads or
    writes: pyarrow also needs `closed`, which GFile lacks. Closing it leaves the file open
    (its `with` block closes it)."""

    def __init__(self, file, writable: bool):
        super().__init__()
        self._file, self._writable = file, writable

    def readable(self) -> bool:
        return not self._writable

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return not self._writable

    def readinto(self, buffer) -> int:
        data = self._file.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def write(self, data) -> int:
        self._file.write(bytes(data))
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._file.seek(offset, whence)
        return self._file.tell()

    def tell(self) -> int:
        return self._file.tell()


@contextlib.contextmanager
def _arrow_file(path: str, mode: str) -> Iterator[Any]:
    """What pyarrow reads ("rb") or writes ("wb"): a local path as it is, a URI's file opened
    in that mode."""
    if not is_remote(path):
        yield path
        return
    with open_file(path, mode) as f:
        yield _Stream(f, writable=mode == "wb")


def read_table(path: str, **kwargs) -> pa.Table:
    """pq.read_table of a local path or a URI."""
    with _arrow_file(path, "rb") as source:
        return pq.read_table(source, **kwargs)


def read_schema(path: str) -> pa.Schema:
    """pq.read_schema of a local path or a URI."""
    with _arrow_file(path, "rb") as source:
        return pq.read_schema(source)


def read_metadata(path: str) -> dict[str, Any]:
    """The JSON schema metadata of a predictions file."""
    raw = read_schema(path).metadata or {}
    return {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW")}


def header_value(name: str, state: int, value: str, number: float):
    """A header's value as the prediction column spells it (None where there is none)."""
    head_is_categorical = SPECS[name].kind.value == "categorical"
    state = LabelState(int(state))
    if state == LabelState.PRESENT:  # the canonical spelling, whatever precision carried it
        return value if head_is_categorical else float(value or number)
    if SPECS[name].missing_is_class and state in (LabelState.ABSENT, LabelState.EMPTY):
        return ABSENT if state == LabelState.ABSENT else EMPTY
    return None


def slice_table(slices: Sequence, logits: Mapping[str, np.ndarray], encoding: LabelEncoding,
                schema: pa.Schema, top_k: int,
                calibrators: Mapping[str, calibration_lib.HeadCalibration] | None = None,
                ood_scores: np.ndarray | None = None,
                unknown_probability: np.ndarray | None = None) -> pa.Table:
    """Rows for predicted slices (sources.StoredSlice) from the model's outputs (rows in the
    same order); probabilities through the heads' calibrators where given."""
    calibrators = calibrators or {}
    columns: dict[str, Any] = {
        "series_key": [s.series_key for s in slices],
        "slice_index": [int(s.slice_index) for s in slices],
        "patient": [s.patient for s in slices],
        "phase": [s.phase for s in slices],
        "file_key": [s.file_key for s in slices],
        "frame": [int(s.frame) for s in slices],
    }
    if "ood_score" in schema.names:
        columns["ood_score"] = np.asarray(ood_scores, np.float32)
        columns["unknown_probability"] = np.asarray(unknown_probability, np.float32)
    # A head without a calibrator (a continuous one too) passes through unchanged.
    decoded = encoding.decode({k: calibration_lib.calibrated_logits(np.asarray(v)[:len(slices)],
                                                                    calibrators.get(k))
                               for k, v in logits.items()}, top_k)
    has_headers = f"{encoding.heads[0].name}_header" in schema.names
    for head in encoding.heads:
        d = decoded[head.name]
        if head.categorical:
            columns[head.name] = list(d["value"])
            columns[f"{head.name}_prob"] = d["top_probs"][:, 0].astype(np.float32)
            columns[f"{head.name}_topk"] = _lists(d["top_classes"], pa.string())
            columns[f"{head.name}_topk_prob"] = _lists(d["top_probs"], pa.float32())
            columns[f"{head.name}_logits"] = _lists(np.asarray(logits[head.name])[:len(slices)],
                                                    pa.float32())
        else:
            columns[head.name] = np.asarray(d["value"], np.float64)
        if has_headers:
            # The slices of a series share their headers: each distinct one is spelled once.
            index, spelled = IAP_NAMES.index(head.name), {}
            column = []
            for s in slices:
                raw = None if s.headers is None else tuple(s.headers[index])
                # (state, value, number): a categorical header's number is NaN, and two NaNs
                # are different keys, so it is keyed by None.
                key = raw and (raw[0], raw[1], None if raw[2] != raw[2] else raw[2])
                if key not in spelled:
                    spelled[key] = None if raw is None else header_value(head.name, *raw)
                column.append(spelled[key])
            columns[f"{head.name}_header"] = column
    return pa.table({f.name: columns[f.name] if isinstance(columns[f.name], pa.Array)
                     else pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def _lists(rows: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """[n, k] values as an Arrow list column, built from the flat values at once (a list per
    row through Python is most of a batch's table time)."""
    rows = np.asarray(rows)
    n, k = rows.shape
    flat = rows.reshape(-1)
    values = pa.array(flat.tolist() if pa.types.is_string(value_type) else flat.astype(np.float32),
                      type=value_type)
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), values)


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    with replacing(path) as tmp, _arrow_file(tmp, "wb") as sink:
        pq.write_table(table, sink)


def merge_parts(parts: Sequence[str], path: str, schema: pa.Schema) -> int:
    """Concatenates part files (in the given order) into one file, atomically; returns rows."""
    rows = 0
    with replacing(path) as tmp, _arrow_file(tmp, "wb") as sink, pq.ParquetWriter(sink, schema) as writer:
        for part in parts:
            table = read_table(part, schema=schema)
            rows += table.num_rows
            if table.num_rows:
                writer.write_table(table)
    return rows


def series_groups(table: pa.Table) -> tuple[list[str], list[np.ndarray]]:
    """The series keys of a slices table (sorted) and the row indices of each."""
    keys = np.asarray(table.column("series_key").to_pylist(), dtype=object)
    order = np.argsort(keys, kind="stable")
    unique, first = np.unique(keys[order].astype(str), return_index=True)
    return list(unique), (np.split(order, first[1:]) if len(order) else [])


def slice_logits(table: pa.Table, head) -> np.ndarray:
    """[slices, classes] stored logits of a categorical head."""
    logits = table.column(f"{head.name}_logits").to_pylist()
    return np.asarray(logits, np.float64).reshape(len(logits), head.size)


def slice_probabilities(table: pa.Table, head, calibration=None) -> np.ndarray:
    """[slices, classes] probabilities of a categorical head from its stored logits, through
    a calibrator (calibration.HeadCalibration, or a temperature) where given."""
    return calibration_lib.probabilities(slice_logits(table, head), calibration)


def series_table(slices_path: str, encoding: LabelEncoding,
                 metadata: Mapping[str, Any] | None = None,
                 calibrators: Mapping[str, calibration_lib.HeadCalibration] | None = None,
                 qa_thresholds: Mapping[str, float] | None = None,
                 ood=None) -> pa.Table:
    """Per-series answers from a slices file (see the module docstring)."""
    calibrators = calibrators or {}
    table = read_table(slices_path)
    has_headers = f"{encoding.heads[0].name}_header" in table.column_names
    unique, groups = series_groups(table)
    columns: dict[str, list] = {"series_key": list(unique)}
    patients = table.column("patient").to_pylist()
    phases = table.column("phase").to_pylist()
    columns["patient"] = [patients[g[0]] for g in groups]
    columns["phase"] = [phases[g[0]] for g in groups]
    columns["num_slices"] = [len(g) for g in groups]
    fields = _key_fields()[:1] + [pa.field("patient", pa.string()), pa.field("phase", pa.int32()),
                                  pa.field("num_slices", pa.int32())]
    outside = [False] * len(groups)
    if "ood_score" in table.column_names and ood is not None:
        slice_scores = table.column("ood_score").to_numpy()
        series_scores = np.array([float(np.median(slice_scores[g])) for g in groups])
        columns["ood_score"] = series_scores.tolist()
        columns["unknown_probability"] = ood.series_unknown_probability(series_scores).tolist()
        # The one out-of-domain decision: the slices table, iap-sort and iap-eval read this
        # column rather than deciding again.
        outside = columns["out_of_domain"] = ood.out_of_domain(series_scores).tolist()
        fields += [pa.field("ood_score", pa.float32()), pa.field("unknown_probability", pa.float32()),
                   pa.field("out_of_domain", pa.bool_())]
    flags: list[list[str]] = [[] for _ in groups]
    for head in encoding.heads:
        if head.categorical:
            top1 = table.column(head.name).to_pylist()
            probs = slice_probabilities(table, head, calibrators.get(head.name))
            answers, confidences, agreements, means = [], [], [], []
            for g in groups:
                mean = probs[g].mean(axis=0)
                means.append(mean)
                answer = head.classes[int(np.argmax(mean))]
                answers.append(answer)
                confidences.append(float(mean.max()))
                agreements.append(float(np.mean([top1[i] == answer for i in g])))
            columns[head.name], columns[f"{head.name}_prob"] = answers, confidences
            columns[f"{head.name}_agreement"] = agreements
            fields += [pa.field(head.name, pa.string()), pa.field(f"{head.name}_prob", pa.float32()),
                       pa.field(f"{head.name}_agreement", pa.float32())]
        else:
            values = np.asarray(table.column(head.name).to_numpy(), np.float64)
            columns[head.name] = [float(np.median(values[g])) for g in groups]
            fields.append(pa.field(head.name, pa.float64()))
        if has_headers:
            headers = table.column(f"{head.name}_header").to_pylist()
            columns[f"{head.name}_header"] = [commonest([headers[i] for i in g]) for g in groups]
            fields.append(pa.field(f"{head.name}_header",
                                   pa.string() if head.categorical else pa.float64()))
            if head.categorical and qa_thresholds and head.name in qa_thresholds:
                for i, (prob, header) in enumerate(zip(columns[f"{head.name}_prob"],
                                                       columns[f"{head.name}_header"])):
                    flags[i] += qa_flags(head, prob, header, header_probability(head, means[i], header),
                                         qa_thresholds[head.name])
    if has_headers and qa_thresholds:
        # Out of its domain the model's confidence means nothing (real archives: a Toshiba
        # series read as GE at 0.99999), so a header it contradicts is no evidence of an error.
        columns["qa_flags"] = [[] if out else f for f, out in zip(flags, outside)]
        columns["qa_note"] = [OUT_OF_DOMAIN_NOTE if out else None for out in outside]
        fields += [pa.field("qa_flags", pa.list_(pa.string())), pa.field("qa_note", pa.string())]
    schema = pa.schema(fields, metadata=_encode_metadata(metadata))
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def mark_out_of_domain_slices(slices_path: str, series: pa.Table) -> None:
    """Adds to the slices table its series' `out_of_domain` (from series_table), so that a
    reader of the slices alone sees it too; nothing without an out-of-distribution model."""
    if "out_of_domain" not in series.column_names:
        return
    table = read_table(slices_path)
    outside = dict(zip(series.column("series_key").to_pylist(),
                       series.column("out_of_domain").to_pylist()))
    column = pa.array([outside[k] for k in table.column("series_key").to_pylist()], pa.bool_())
    write_parquet_atomic(table.append_column(pa.field("out_of_domain", pa.bool_()), column),
                         slices_path)


def accuracy(slices_path: str, series_path: str | None = None) -> dict[str, dict[str, float]]:
    """Per IAP against the headers the input carried (metrics.summarise): categorical
    {count, top1, top2, series_count, series_top1}; continuous {count, mae, r2, unit,
    series_count, series_mae}; {} when the input carried no headers."""
    encoding = LabelEncoding.from_json(read_metadata(slices_path)["label_encoding"])
    tables = {"": read_table(slices_path)}
    if series_path:
        tables["series_"] = read_table(series_path)
    result = {}
    for head in encoding.heads:
        if f"{head.name}_header" not in tables[""].column_names:
            return {}
        m: dict[str, float] = {}
        for prefix, table in tables.items():
            headers = table.column(f"{head.name}_header").to_pylist()
            if head.categorical:
                truth = [target_class(head, h) for h in headers]
                top1 = table.column(head.name).to_pylist()
                # A series has its answer alone; a slice its top-k too.
                topk = (table.column(f"{head.name}_topk").to_pylist() if not prefix
                        else [[c] for c in top1])
                sums = metrics.categorical_sums([t is not None for t in truth],
                                                [a == t for a, t in zip(top1, truth)],
                                                [t in k[:2] for k, t in zip(topk, truth)])
            else:
                sums = metrics.continuous_sums(table.column(head.name).to_numpy(),
                                               metrics.label_values(head, headers))
            scores = metrics.summarise(head, sums)
            if not prefix:
                m.update(scores)
            else:
                m["series_count"] = scores["count"]
                key = "top1" if head.categorical else "mae"
                m[f"series_{key}"] = scores[key]
        result[head.name] = m
    return result


def summary_table(slices_path: str, series_path: str | None = None) -> str:
    """The per-IAP table against the input's headers ("" when it carried none)."""
    scores = accuracy(slices_path, series_path)
    return metrics.score_table(scores) if scores else ""


def write_csv(table: pa.Table, path: str) -> None:
    """CSV beside the Parquet: list columns joined by '|', logits left out."""
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    columns = {}
    for name in table.column_names:
        if name.endswith("_logits"):
            continue
        column = table.column(name)
        if pa.types.is_list(column.type):
            column = pc.binary_join(pc.cast(column, pa.list_(pa.string())), "|")
        columns[name] = column
    with replacing(path) as tmp, _arrow_file(tmp, "wb") as sink:
        pcsv.write_csv(pa.table(columns), sink)
