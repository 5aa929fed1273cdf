"""`lifelog-ray classify`: search -> select on validation -> refit -> score on test -> Table 3 and saved pipelines."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import storage
from ..config import SPLIT_NAMES, StudyConfig, write_resolved
from ..errors import LifelogError
from ..events import EVENT_METRICS, summary_metrics
from ..lease import leased
from ..metrics import METRIC_COLUMNS, TABLE_METRICS, full_report, scores
from ..results import DEFAULT_PROTOCOL, best_row, of_protocol
from ..temporal import Smoother, choose, class_scores, sequences
from .data import FeatureSet, discover, load_feature_sets
from .estimators import ClassifierSpec, load_search_space, params_json
from .persist import save_pipeline, serialize
from .search import run_search

log = logging.getLogger(__name__)

PAPER_LAYER_ORDER = ["predictions", "fc2", "fc1", "flatten"]
TABLE_BLOCKS = list(zip(("Accuracy", "Precision", "Recall", "F1 Score"), TABLE_METRICS))  # Table 3's blocks


@dataclass
class ClassifyResult:
    trials: pd.DataFrame
    results: pd.DataFrame
    output: Path
    seconds: float
    skipped: bool = False

    def line(self) -> str:
        ok = (self.trials["status"] == "ok").sum()
        shown = of_protocol(self.results)
        best = best_row(shown if len(shown) else self.results)
        return (("classify (results current, skipped): " if self.skipped else "classify: ") + f"{len(self.trials)} trials ({ok} ok, {len(self.trials) - ok} failed) in "
                f"{self.seconds:.0f}s; best test accuracy {100 * best['accuracy']:.2f}% "
                f"({best['model']}/{best['layer']} + {best['classifier']}){self._day_part()} -> {self.output}")

    def _day_part(self) -> str:
        """With the day protocol too: its best per-image and best smoothed test accuracy."""
        day = of_protocol(self.results, "day")
        if day.empty:
            return ""
        b = best_row(day)
        part = f"; day split {100 * b['accuracy']:.2f}% ({b['layer']} + {b['classifier']})"
        smoothed = of_protocol(self.results, "day", "smoothed")
        if len(smoothed):
            s = best_row(smoothed)
            part += f", smoothed {100 * s['accuracy']:.2f}% ({s['layer']} + {s['classifier']}, {s['smoothing'] or 'none'})"
        return part


def _is_xgboost(spec: ClassifierSpec) -> bool:
    return spec.estimator == "xgboost.XGBClassifier"


def _use_distributed(cfg: StudyConfig, spec: ClassifierSpec, fs: FeatureSet) -> bool:
    mode = cfg.classify.xgboost_distributed
    if not _is_xgboost(spec) or mode == "never":
        return False
    return mode == "always" or len(fs.y["train"]) >= cfg.classify.distributed_min_rows


def _refit_data(fs: FeatureSet, refit_on: str) -> tuple[np.ndarray, np.ndarray]:
    if refit_on == "train+val":
        return np.concatenate([fs.X["train"], fs.X["val"]]), np.concatenate([fs.y["train"], fs.y["val"]])
    return fs.X["train"], fs.y["train"]


def refit_and_test(fs: FeatureSet, spec: ClassifierSpec, params: dict, refit_on: str, seed: int, n_jobs: int,
                   distributed: bool = False, workers: int = 2) -> dict[str, Any]:
    """Refit the chosen point and score it once on the test split; return the report and the model bytes."""
    X, y = _refit_data(fs, refit_on)
    t0 = time.perf_counter()
    if distributed:
        from .xgb_dist import booster_proba, fit_distributed, predict_booster

        booster = fit_distributed(X, y, params, len(fs.classes), workers, seed, spec.fixed)
        pred = predict_booster(booster, fs.X["test"])
        proba = {s: booster_proba(booster, fs.X[s]) for s in ("val", "test")}
        blob, fmt = bytes(booster.save_raw("ubj")), "xgboost-booster-ubj"
    else:
        est = spec.build(params, seed=seed, n_jobs=n_jobs)
        est.fit(X, y)
        pred = np.asarray(est.predict(fs.X["test"]))
        proba = {s: class_scores(est, fs.X[s], len(fs.classes)) for s in ("val", "test")}  # for temporal smoothing
        blob, fmt = serialize(est, _is_xgboost(spec))
    report = full_report(fs.y["test"], pred, fs.classes)
    return {"report": report, "pred": pred, "proba": proba, "blob": blob, "format": fmt,
            "fit_s": time.perf_counter() - t0}


def smooth_test(fs: FeatureSet, fitted: dict, method: str, seqs: dict[str, list[np.ndarray]] | None,
                select_metric: str) -> tuple[Smoother | None, np.ndarray]:
    """The smoother chosen on validation (by the selection metric), and the test labels it gives. Each split
    is smoothed alone: a test image's neighbours are test images, so no training label leaks in."""
    if seqs is None or method == "none":
        return None, fitted["pred"]
    smoother = choose(method, fitted["proba"]["val"], fs.y["val"], seqs["val"],
                      lambda y, p: scores(y, p)[select_metric])
    if smoother is None:
        return None, fitted["pred"]
    return smoother, np.argmax(smoother.apply(fitted["proba"]["test"], seqs["test"]), axis=1)


def summary_scores(fs: FeatureSet, pred: np.ndarray, times: pd.DataFrame | None, max_gap_s: float) -> dict[str, float]:
    """How good the lifelog summaries made from these test labels are: events and time budgets of the true
    labels against the predicted ones (events.summary_metrics); NaN without timestamps."""
    if times is None:
        return dict.fromkeys(EVENT_METRICS, float("nan"))
    t = times.reindex(fs.ids["test"])
    frames = pd.DataFrame({"image_id": fs.ids["test"], "day": t["day"].to_numpy(), "timestamp": t["timestamp"].to_numpy(),
                           "true": [fs.classes[i] for i in fs.y["test"]], "pred": [fs.classes[i] for i in pred]})
    return summary_metrics(frames, "true", "pred", max_gap_s)


def split_sequences(fs: FeatureSet, times: pd.DataFrame | None, max_gap_s: float) -> dict[str, list[np.ndarray]] | None:
    """Per split, the time-ordered sequences of its images (indices into fs.X[split])."""
    if times is None:
        return None
    out = {}
    for s in ("val", "test"):
        t = times.reindex(fs.ids[s])
        out[s] = sequences(t["day"].to_numpy(), t["timestamp"].to_numpy(), max_gap_s)
    return out


def manifest_times(study: Path) -> pd.DataFrame | None:
    """image_id -> (day, timestamp) from the manifest; None (smoothing off, with a warning) without one."""
    path = study / "manifest.parquet"
    if not path.exists():
        log.warning("classify: no manifest.parquet in %s, so no timestamps; temporal smoothing is skipped", study)
        return None
    m = storage.read_parquet(path, columns=["image_id", "day", "timestamp"])
    return m.assign(image_id=m["image_id"].astype(str)).set_index("image_id")


def order_layers(layers: list[str]) -> list[str]:
    known = [la for la in PAPER_LAYER_ORDER if la in layers]
    return known + sorted(la for la in layers if la not in known)


def table3(results: pd.DataFrame, classifiers: list[str], protocol: str = DEFAULT_PROTOCOL,
           temporal: str = "none") -> tuple[str, pd.DataFrame]:
    """The paper's Table 3: blocks per metric, rows = layers (per model), columns = classifiers, in percent."""
    rows, md = [], []
    models = sorted(results["model"].unique())
    for title, col in TABLE_BLOCKS:
        md.append(f"\n**{title}**" + (" (macro)" if col != "accuracy" else "") + "\n")
        md.append("| Model | Layer | " + " | ".join(classifiers) + " |")
        md.append("|---|---|" + "---|" * len(classifiers))
        for m in models:
            sub = results[results["model"] == m]
            for layer in order_layers(list(sub["layer"].unique())):
                vals = {}
                for c in classifiers:
                    hit = sub[(sub["layer"] == layer) & (sub["classifier"] == c)]
                    vals[c] = round(100 * float(hit[col].iloc[0]), 2) if len(hit) else None
                rows.append({"metric": title, "model": m, "layer": layer, **vals})
                cells = [f"{v:.2f}" if v is not None else "—" for v in vals.values()]
                md.append(f"| {m} | {layer} | " + " | ".join(cells) + " |")
    header = "# Table 3: Approach 1 (pre-trained features + PCA + classifiers), test split, percent\n"
    if protocol != DEFAULT_PROTOCOL:
        header += f"\nProtocol: {protocol} (whole days per split: test days are days the model never saw).\n"
    if temporal == "smoothed":
        header += ("\nTemporally smoothed: each pipeline's class probabilities smoothed along each day's test "
                   "images, with the smoother chosen on validation (results.parquet, column smoothing).\n")
    return header + "\n".join(md) + "\n", pd.DataFrame(rows)


def _signature(study: Path, pairs: list[tuple[str, str]], cfg: StudyConfig, specs: list[ClassifierSpec],
               day_splits: dict[str, str] | None) -> str:
    """What the results depend on: the classify config, the search space, the feature shards present and,
    under the day protocol, the manifest's day splits."""
    h = hashlib.sha1(json.dumps([cfg.classify.model_dump(mode="json"), [asdict(s) for s in specs],
                                 sorted(day_splits.items()) if day_splits else None],
                                sort_keys=True, default=str).encode())
    for m, la in pairs:
        for f in storage.files(study / "features" / m / la, (".parquet",)):
            h.update(f"{storage.relative(f, study)}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def day_splits(study: Path) -> dict[str, str]:
    """image_id -> the manifest's `split_day` (whole days per split)."""
    manifest = storage.read_parquet(study / "manifest.parquet")
    if "split_day" not in manifest:
        raise LifelogError(f"{study}/manifest.parquet has no split_day column (built by an older version); "
                           f"rerun `lifelog-ray manifest` (the per-image splits are kept)")
    return dict(zip(manifest["image_id"].astype(str), manifest["split_day"].astype(str)))


def usable_protocols(study: Path, protocols: list[str]) -> tuple[list[str], dict[str, str] | None]:
    """The protocols that can run, and the day splits when the day protocol is one of them. A lifelog of
    too few days leaves a day split empty: with `both` the day protocol is skipped with a warning, asked
    for alone it is a one-line error."""
    if "day" not in protocols:
        return list(protocols), None
    days = day_splits(study)
    missing = [s for s in SPLIT_NAMES if s not in set(days.values())]
    if not missing:
        return list(protocols), days
    msg = (f"the day protocol needs whole days in train, val and test, and this lifelog's days leave "
           f"{' and '.join(missing)} empty (it needs at least 3 days; `lifelog-ray sample` writes 10)")
    if protocols == ["day"]:
        raise LifelogError(f"{msg}; use --protocol image")
    log.warning("classify: %s; only the per-image protocol runs", msg)
    return [p for p in protocols if p != "day"], None


def _suffix(protocol: str) -> str:
    """File-name suffix of a protocol's outputs: none for the paper's, so their paths do not change."""
    return "" if protocol == DEFAULT_PROTOCOL else f"__{protocol}"


@leased("classify")
def run_classify(cfg: StudyConfig, force: bool = False) -> ClassifyResult:
    """Run the study; a rerun with the same config and feature shards returns the saved results."""
    import ray

    from ..runtime import ensure_ray

    c = cfg.classify
    study = cfg.study_dir
    out = study / "classify"
    t0 = time.perf_counter()
    pairs = discover(study, c.models, c.layers)
    specs = load_search_space(c.search_space, c.classifiers)
    protocols, days = usable_protocols(study, c.protocols)
    sig = _signature(study, pairs, cfg, specs, days)
    done = out / "_done.json"
    if not force and done.exists() and json.loads(done.read_text("utf-8")).get("signature") == sig:
        log.info("classify: results are current (signature %s), skipping", sig)
        return ClassifyResult(storage.read_parquet(out / "trials.parquet"), storage.read_parquet(out / "results.parquet"),
                              out, 0.0, skipped=True)
    ensure_ray(cfg.ray)
    # One feature set per protocol and (model, layer), PCA fitted on that protocol's train split: each (model, layer)
    # read once, then fitted and reduced for every protocol, by a Ray task on a worker, where the trials use them.
    # The driver gets each set without its feature rows (labels, ids, the PCA); a trial fetches its own set only.
    prepare = ray.remote(num_cpus=1, max_retries=1)(_prepare_set).options(num_returns=2 * len(protocols))
    refs = {}
    for m, la in pairs:
        made = prepare.remote(study, m, la, c.pca, c.pca_solver, c.seed,
                              [days if proto == "day" else None for proto in protocols])
        for i, proto in enumerate(protocols):
            refs[f"{proto}:{m}/{la}"] = (made[2 * i], made[2 * i + 1])
    full = {k: whole for k, (whole, _) in refs.items()}
    sets = dict(zip(refs, _get([light for _, light in refs.values()])))
    n_jobs = max(1, int(c.cpus_per_trial))
    points, dist_points = [], []
    for key, fs in sets.items():
        protocol = key.split(":", 1)[0]
        for spec in specs:
            for i, params in enumerate(spec.points()):
                p = {"set": key, "protocol": protocol, "model": fs.model, "layer": fs.layer, "classifier": spec.name,
                     "index": i, "point": f"{key}/{spec.name}/{i}", "params": params, "spec": asdict(spec),
                     "seed": c.seed, "n_jobs": n_jobs}
                (dist_points if _use_distributed(cfg, spec, fs) else points).append(p)
    out.mkdir(parents=True, exist_ok=True)
    with storage.scratch_dir(out / "tune") as tune_dir:  # Tune's own state: local scratch for a remote study
        records = {r["point"]: r for r in run_search(full, points, tune_dir, c.cpus_per_trial)}
    whole: dict[str, FeatureSet] = {}  # the sets distributed XGBoost's driver-side fit needs whole
    for p in dist_points:  # each a Ray Train run: data-parallel XGBoost for feature sets too big for one worker
        from .xgb_dist import fit_distributed, predict_booster

        if p["set"] not in whole:
            whole[p["set"]] = _get(full[p["set"]])
        fs, spec = whole[p["set"]], ClassifierSpec(**p["spec"])
        try:
            t1 = time.perf_counter()
            b = fit_distributed(fs.X["train"], fs.y["train"], p["params"], len(fs.classes), c.xgboost_workers,
                                c.seed, spec.fixed)
            rec = {f"val_{k}": v for k, v in scores(fs.y["val"], predict_booster(b, fs.X["val"])).items()}
            records[p["point"]] = {"point": p["point"], "status": "ok", "error": "", **rec,
                                   "fit_s": time.perf_counter() - t1}
        except Exception as e:  # noqa: BLE001 - recorded like any failed trial
            records[p["point"]] = {"point": p["point"], "status": "error", "error": f"{type(e).__name__}: {e}"}
    rows = []
    for p in points + dist_points:
        r = records.get(p["point"], {"status": "error", "error": "trial produced no result"})
        rows.append({"protocol": p["protocol"], "model": p["model"], "layer": p["layer"], "classifier": p["classifier"],
                     "point_index": p["index"], "params": params_json(p["params"]),
                     "distributed": p in dist_points, **{k: v for k, v in r.items() if k != "point"}})
    trials = pd.DataFrame(rows)
    metric = f"val_{c.select_metric}"
    if metric not in trials:
        trials[metric] = np.nan
    storage.write_df_atomic(trials, out / "trials.parquet")
    ok = trials[trials["status"] == "ok"]
    if ok.empty:
        raise LifelogError(f"classify: every trial failed; see {out / 'trials.parquet'} (column error)")
    # Best point per (model, layer, classifier): highest validation metric, ties to the earliest grid point
    # (GridSearchCV's rule), so the choice is reproducible.
    best = (ok.sort_values([metric, "point_index"], ascending=[False, True])
              .groupby(["protocol", "model", "layer", "classifier"], sort=False).head(1))
    spec_by_name = {s.name: s for s in specs}
    remote = ray.remote(num_cpus=c.cpus_per_trial)(_refit_remote)
    jobs = []
    for _, b in best.iterrows():
        key = f"{b['protocol']}:{b['model']}/{b['layer']}"
        spec, params = spec_by_name[b["classifier"]], json.loads(b["params"])
        distributed = _use_distributed(cfg, spec, sets[key])
        if distributed:
            if key not in whole:
                whole[key] = _get(full[key])
            jobs.append((b, spec, params, refit_and_test(whole[key], spec, params, c.refit_on, c.seed, n_jobs,
                                                         True, c.xgboost_workers)))
        else:
            jobs.append((b, spec, params, remote.remote(full[key], spec, params, c.refit_on, c.seed, n_jobs)))
    times = manifest_times(study) if c.temporal != "none" else None
    result_rows, pred_frames = [], []
    for b, spec, params, job in jobs:
        fitted = job if isinstance(job, dict) else ray.get(job)
        protocol = b["protocol"]
        fs = sets[f"{protocol}:{b['model']}/{b['layer']}"]
        rep = fitted["report"]
        smoother, smoothed = smooth_test(fs, fitted, c.temporal, split_sequences(fs, times, c.temporal_max_gap_s),
                                         c.select_metric)
        smoothing = smoother.describe() if smoother else ""
        path = save_pipeline(out, fs, spec, params, fitted, protocol, smoothing)
        tag = f"{fs.model}__{fs.layer}__{spec.name}{_suffix(protocol)}"
        storage.write_text_atomic(json.dumps(rep, indent=1), out / "reports" / f"{tag}.json")
        cm = pd.DataFrame(rep["confusion"], index=fs.classes, columns=fs.classes)
        storage.write_text_atomic(cm.to_csv(index_label="true\\predicted"), out / "confusion" / f"{tag}.csv")
        row = {"protocol": protocol, "model": fs.model, "layer": fs.layer, "classifier": spec.name,
               "params": params_json(params), f"val_{c.select_metric}": float(b[metric]),
               "pca_components": fs.n_components if fs.pca is not None else None, "feature_width": fs.width,
               "n_train": len(fs.y["train"]), "n_test": len(fs.y["test"]), "refit_on": c.refit_on,
               "distributed": bool(b["distributed"]), "pipeline": str(path)}
        # One row per image (the paper's figure) and, with smoothing on, one smoothed row beside it.
        variants = [("none", "", fitted["pred"], rep)]
        if times is not None:
            variants.append(("smoothed", smoothing, smoothed, full_report(fs.y["test"], smoothed, fs.classes)))
        for temporal, smoothing_, pred, report in variants:
            result_rows.append({**row, "temporal": temporal, "smoothing": smoothing_,
                                **{k: report[k] for k in METRIC_COLUMNS},
                                **summary_scores(fs, pred, times, c.temporal_max_gap_s)})
            pred_frames.append(pd.DataFrame({
                "protocol": protocol, "temporal": temporal, "model": fs.model, "layer": fs.layer,
                "classifier": spec.name, "image_id": fs.ids["test"], "true": [fs.classes[i] for i in fs.y["test"]],
                "pred": [fs.classes[i] for i in pred]}))
    results = pd.DataFrame(result_rows)
    storage.write_df_atomic(results, out / "results.parquet")
    storage.write_df_atomic(pd.concat(pred_frames, ignore_index=True), out / "predictions.parquet")
    # table3.md is the paper's table (per image, per-image split); beside it the day protocol's
    # (table3__day) and the smoothed companions (table3__smoothed, table3__day__smoothed).
    written = set()
    for protocol in protocols:
        for temporal in ("none", "smoothed") if times is not None else ("none",):
            name = f"table3{_suffix(protocol)}{'__smoothed' if temporal == 'smoothed' else ''}"
            md, csv = table3(of_protocol(results, protocol, temporal), [s.name for s in specs], protocol, temporal)
            storage.write_text_atomic(md, out / f"{name}.md")
            storage.write_text_atomic(csv.to_csv(index=False), out / f"{name}.csv")
            written.add(name)
    for stale in storage.files(out, (".md", ".csv")) if out.exists() else []:
        if stale.parent == out and stale.stem.startswith("table3") and stale.stem not in written:
            storage.unlink(stale)  # a table from an earlier run with other protocols or smoothing
    write_resolved(cfg, out)
    storage.write_text_atomic(json.dumps({"signature": sig, "finished": time.time()}), done)  # last: marks complete
    return ClassifyResult(trials, results, out, time.perf_counter() - t0)


def _prepare_set(study: Path, model: str, layer: str, pca: float | int | None, solver: str, seed: int,
                 protocols: list[dict[str, str] | None]) -> list[FeatureSet]:
    """A Ray task: one (model, layer) read once on a worker, PCA-fitted and reduced under each protocol's splits.
    Returns, per protocol, the set (kept in that worker's object store for the trials and the refit) and its copy
    without feature rows (for the driver)."""
    out: list[FeatureSet] = []
    for fs in load_feature_sets(study, model, layer, pca, solver, seed, protocols=protocols):
        out += [fs, fs.light()]
    return out


def _get(refs: Any) -> Any:
    """ray.get, with a task's own one-line error (a LifelogError: an empty split, a study being written) raised
    as itself, not wrapped in Ray's traceback."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, LifelogError):
            raise LifelogError(str(cause)) from None
        raise


def _refit_remote(fs: FeatureSet, spec: ClassifierSpec, params: dict, refit_on: str, seed: int, n_jobs: int) -> dict:
    return refit_and_test(fs, spec, params, refit_on, seed, n_jobs)


