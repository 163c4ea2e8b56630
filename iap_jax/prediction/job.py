"""One prediction job (iap-predict, whose command line is predict_cli): the checkpoint's
model over an input, unit by unit, into part files a killed run resumes from, then the
merged tables and the report (process 0). Its outputs and exit statuses are described in
predict_cli."""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils

from iap_jax.core.preprocess import PixelSpec
from iap_jax.core.progress import Progress
from iap_jax.io import local_paths, sources
from iap_jax.io import salt as salt_lib
from iap_jax.io.checkpoints import restore_model
from iap_jax.io.storage import absolute, is_remote, makedirs, read_json, write_json_atomic
from iap_jax.prediction import tables
from iap_jax.prediction.calibration import CALIBRATION_FILE, head_calibrators, load_calibration
from iap_jax.prediction.engine import (Predictor, Reader, batches, checkpoint_fingerprint,
                                       encoding_sha256)
from iap_jax.prediction.ood import load_ood

PARTS = "parts"
REPORT_FILE = "predict_report.json"


# --- helpers ----------------------------------------------------------------------------

def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _training_salt(config: dict) -> str | None:
    """The salt kept beside the checkpoint's training data (iap-prep's data dir, three levels
    above <data_dir>/iap_dataset/<config>/<version>), if any."""
    dataset_dir = config.get("dataset_dir") or ""
    if not dataset_dir:
        return None
    dataset_dir = (dataset_dir.rstrip("/") if is_remote(dataset_dir)
                   else os.path.normpath(dataset_dir))
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(dataset_dir)))
    return salt_lib.kept_salt(data_dir) if data_dir and epath.Path(data_dir).is_dir() else None


def resolve_salt(args, config: dict, out_dir: str) -> tuple[str, str]:
    """(salt, where it came from) for the input's file, series and patient keys."""
    if args.salt:
        return args.salt, "--salt"
    if os.environ.get(salt_lib.SALT_ENV):
        return os.environ[salt_lib.SALT_ENV], f"${salt_lib.SALT_ENV}"
    kept = _training_salt(config)
    if kept:
        return kept, "the training data dir's prep_salt"
    salt = salt_lib.resolve_salt(out_dir, None, announce=lambda message: None)
    return salt, ("generated and kept in OUT_DIR/prep_salt: keys will not match a prep run "
                  "made with another salt")


# --- the run ----------------------------------------------------------------------------

def _run_signature(args, restored: dict, source, spec, units, salt: str | None) -> dict:
    return {"checkpoint": restored["directory"], "step": restored["step"],
            "label_encoding_sha256": encoding_sha256(restored["label_encoding"]),
            "pixel_spec": spec.to_json(),
            "input": salt_lib.salted_hash(source.salt, "input", absolute(args.input)),
            "split": args.split, "kind": source.kind,
            "top_k": args.top_k,
            "salt_sha256": hashlib.sha256(salt.encode()).hexdigest() if salt else None,
            "plan_sha256": _sha256([[u.id, list(u.entries)] for u in units])}


def _check_signature(parts_dir: str, signature: dict, overwrite: bool) -> None:
    path = os.path.join(parts_dir, "run.json")
    if epath.Path(path).exists():
        old = read_json(path)
        # A key missing from an older signature counts as null (the same run).
        changed = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
        if not changed:
            return
        if not overwrite:
            raise ValueError(f"{parts_dir} holds parts of another run (different {changed}); "
                             f"pass --overwrite to discard them, or use another --out")
        for stale in epath.Path(parts_dir).iterdir():
            stale.unlink()
    write_json_atomic(path, signature)


def predict(args) -> dict:
    """Runs the prediction of `args` (see build_parser); returns the report."""
    started = time.time()
    out_dir = args.out
    parts_dir = os.path.join(out_dir, PARTS)
    chief = jax.process_index() == 0
    if args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: must be at least 1")
    makedirs(parts_dir)

    # The model is compiled only once the reader runs (below), so that the reader's start-up
    # (opening the input, tracing its parser) overlaps the compilation.
    mesh = Predictor.local_mesh()
    restored = restore_model(args.workdir, mesh, args.step)
    batch_size = Predictor.global_batch_size(args.batch_size, mesh.size)
    step, encoding = restored["step"], restored["label_encoding"]
    overrides = {k: v for k, v in (("series_filter", args.series_filter), ("phases", args.phases),
                                   ("slices", args.slices)) if v is not None}
    spec = PixelSpec.from_json({**restored["pixel_spec"].to_json(), **overrides})
    calibration = None if args.no_calibration else load_calibration(args.workdir, step)
    calibrators = head_calibrators(calibration, encoding, os.path.join(args.workdir, CALIBRATION_FILE))
    ood = None if args.no_calibration else load_ood(
        args.workdir, step, encoding_sha256(encoding), checkpoint_fingerprint(restored["params"]))
    if ood is not None and args.false_unknown_rate is not None:
        ood = ood.with_rate(args.false_unknown_rate)
    salt_info: dict[str, str] = {}

    def salt() -> str:
        value, where = resolve_salt(args, restored["config"], out_dir)
        salt_info.update(value=value, source=where)
        return value

    source = sources.open_source(args.input, spec, split=args.split, salt=salt,
                                 workers=args.workers, progress=not args.quiet and chief)

    # ------------------------------------------------------------ plan (process 0) ---
    plan_path = os.path.join(parts_dir, "plan.json")
    if chief:
        units = source.plan()
        signature = _run_signature(args, restored, source, spec, units, salt_info.get("value"))
        signature["calibrators"] = {k: c.to_json() for k, c in calibrators.items()}
        signature["ood"] = ood.summary() if ood else None
        _check_signature(parts_dir, signature, args.overwrite)
        write_json_atomic(plan_path, {"units": [[u.id, list(u.entries)] for u in units]})
    _barrier("iap_predict_plan")
    if not chief:
        units = [sources.Unit(uid, tuple(tuple(e) if isinstance(e, list) else e for e in entries))
                 for uid, entries in read_json(plan_path)["units"]]

    def part_path(unit_id: str) -> str:
        return os.path.join(parts_dir, f"{unit_id}.parquet")

    mine = [u for i, u in enumerate(units) if i % jax.process_count() == jax.process_index()]
    todo = [u for u in mine if not epath.Path(part_path(u.id)).exists()]
    metadata = {"checkpoint": restored["directory"], "step": step,
                "label_encoding": encoding.to_json(), "pixel_spec": spec.to_json(),
                "calibration": calibration, "ood": ood.summary() if ood else None}
    schema = tables.slice_schema(encoding, source.has_headers, metadata, ood=ood is not None)

    # ------------------------------------------------------------ predict ------------
    label = "predict" if jax.process_count() == 1 else f"predict[{jax.process_index()}]"
    meter = None if args.quiet or not todo else Progress(label, source.expected_slices(todo),
                                                         unit="images")
    skips_by_unit: dict[str, list] = {}
    reader = Reader(batches(source, todo, skips_by_unit, batch_size, spec.stored_size))
    reader.start()
    try:
        predictor = Predictor(restored, mesh, batch_size, args.conv_impl, args.dtype)
        pending: dict[str, list] = {}  # unit id -> its slices' tables so far
        in_flight = None
        wait_s, predicted, compute_start = 0.0, 0, time.time()
        first_wait_s = None  # until the first batch: the reader's start-up, not its pace

        def finish(flight) -> None:
            unit_id, slices, (outputs, features) = flight
            logits, features = jax.device_get((outputs, features))
            scores = ood.score({k: v[:len(slices)] for k, v in features.items()}) if ood else None
            pending.setdefault(unit_id, []).append(tables.slice_table(
                slices, logits, predictor.encoding, schema, args.top_k, calibrators, scores,
                ood.slice_unknown_probability(scores) if ood else None))

        while True:
            wait_start = time.time()
            item = reader.items.get()
            wait_s += time.time() - wait_start
            if item[0] == "error":
                raise item[1]
            if item[0] == "done":
                break
            if item[0] == "batch":
                if first_wait_s is None:
                    first_wait_s = wait_s
                _, unit_id, slices, images, scales, offsets = item
                outputs = predictor(images, scales, offsets)  # runs while the last is decoded
                if in_flight is not None:
                    finish(in_flight)
                in_flight = (unit_id, slices, outputs)
                predicted += len(slices)
                if meter:
                    meter.advance(len(slices))
                continue
            unit_id = item[1]  # "end": the unit's rows and skips are complete
            if in_flight is not None:
                finish(in_flight)
                in_flight = None
            table = (tables.pa.concat_tables(pending.pop(unit_id)) if unit_id in pending
                     else schema.empty_table())
            write_json_atomic(part_path(unit_id) + ".skips.json",
                               [s.to_json() for s in skips_by_unit.pop(unit_id, [])])
            tables.write_parquet_atomic(table, part_path(unit_id))  # marks the unit done
    finally:  # also when the model cannot be built or a batch fails: no reader or pool left
        reader.stop()
        source.close()
    compute_s = time.time() - compute_start
    if meter:
        meter.close()
    write_json_atomic(os.path.join(parts_dir, f"process-{jax.process_index()}.json"), {
        "images": predicted, "seconds": compute_s, "input_wait_s": wait_s,
        "first_batch_wait_s": first_wait_s or 0.0,
        "units": len(todo), "units_resumed": len(mine) - len(todo),
        "devices": [str(d) for d in jax.local_devices()]})
    _barrier("iap_predict_done")
    if not chief:
        return {}

    # ------------------------------------------------------------ tables and report (process 0)
    slices_path = os.path.join(out_dir, "slices.parquet")
    series_path = os.path.join(out_dir, "series.parquet")
    rows = tables.merge_parts([part_path(u.id) for u in units], slices_path, schema)
    qa = (calibration or {}).get("qa", {}).get("thresholds")
    series = tables.series_table(slices_path, predictor.encoding, metadata, calibrators, qa, ood)
    tables.write_parquet_atomic(series, series_path)
    tables.mark_out_of_domain_slices(slices_path, series)
    if args.csv:
        tables.write_csv(tables.read_table(slices_path), os.path.join(out_dir, "slices.csv"))
        tables.write_csv(series, os.path.join(out_dir, "series.csv"))
    skipped = [s.to_json() for s in source.plan_skips]
    for unit in units:
        skipped += read_json(part_path(unit.id) + ".skips.json")
    processes = [read_json(os.path.join(parts_dir, f"process-{i}.json"))
                 for i in range(jax.process_count())]
    images = sum(p["images"] for p in processes)
    seconds = max((p["seconds"] for p in processes), default=0.0)
    report = {
        "checkpoint": {"workdir": absolute(args.workdir), "path": predictor.directory,
                       "step": predictor.step,
                       "label_encoding_sha256": predictor.encoding_sha256(),
                       "pixel_spec": spec.to_json(), "calibration": calibration,
                       "ood": ood.summary() if ood else None},
        "input": {"kind": source.kind, "split": args.split, "salt": salt_info.get("source"),
                  **source.notes},
        "counts": {"units": len(units), "slices": rows, "series": series.num_rows,
                   "out_of_domain_series": (sum(series.column("out_of_domain").to_pylist())
                                            if "out_of_domain" in series.column_names else None),
                   "skipped_inputs": len(skipped),
                   "skipped_slices": sum(int(s.get("slices", 1)) for s in skipped)},
        "skipped_by_reason": _count_reasons(skipped),
        "skipped": skipped,
        "run": {"processes": jax.process_count(), "devices": sum(len(p["devices"]) for p in processes),
                "device_kind": jax.local_devices()[0].device_kind, "backend": jax.default_backend(),
                "convolutions": predictor.convolutions, "dtype": predictor.dtype,
                "batch_size": predictor.batch_size, "compile_s": round(predictor.compile_s, 2),
                "images_this_run": images, "seconds": round(seconds, 2),
                "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
                "input_wait_share": round(sum(p["input_wait_s"] for p in processes) /
                                          max(sum(p["seconds"] for p in processes), 1e-9), 3),
                # The same after the first batch (the steady pace on a large input), and the
                # wait for the first batch (the reader's start-up: opening, tracing the parser).
                "input_wait_share_after_first_batch": round(
                    sum(p["input_wait_s"] - p.get("first_batch_wait_s", 0.0) for p in processes) /
                    max(sum(p["seconds"] - p.get("first_batch_wait_s", 0.0) for p in processes), 1e-9), 3),
                "first_batch_wait_s": round(max((p.get("first_batch_wait_s", 0.0) for p in processes),
                                                default=0.0), 2),
                "units_resumed": sum(p["units_resumed"] for p in processes),
                "wall_s": round(time.time() - started, 1)},
        "outputs": {"slices": "slices.parquet", "series": "series.parquet",
                    **({"csv": ["slices.csv", "series.csv"]} if args.csv else {}),
                    "local_paths": None if args.no_local_paths else local_paths.FILE_NAME},
    }
    paths_file = os.path.join(out_dir, local_paths.FILE_NAME)
    if args.no_local_paths:  # a file of an earlier run would name files this run does not
        epath.Path(paths_file).unlink(missing_ok=True)
    else:
        local_paths.write(out_dir, absolute(source.root), source.paths, input=absolute(args.input))
    write_json_atomic(os.path.join(out_dir, REPORT_FILE), report)
    return report


def _count_reasons(skipped) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    return dict(sorted(counts.items()))
