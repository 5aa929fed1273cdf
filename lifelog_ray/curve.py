"""The paper's open question: would more labelled data help? A data-availability curve for both approaches.

Stratified fractions of the train split, several seeds: the same image subsets (drawn once, by image id,
from the train images that have features) for Approach 1 (the best feature pipeline: tap, PCA, classifier)
and Approach 2 (the best fine-tuning method, or `curve.method`). Each is scored on the unchanged test split,
and fine-tuning stops early on the unchanged validation split. Approach 1's runs are one Ray Tune grid of
trials. Approach 2's are one Ray Tune grid of Ray Train runs, run side by side as far as the cluster holds
them. A finished (approach, fraction, seed) is never trained again, and an interrupted fine-tuning run
resumes from its last checkpoint. A saturating power law is fitted per approach (lifelog_ray/powerlaw.py).
It writes data only (`curve/`); the report renders it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import progress, storage
from .classify.data import load_feature_set
from .classify.estimators import fit_pca_classifier, load_search_space
from .config import StudyConfig, rebase_paths
from .errors import LifelogError
from .lease import leased
from .metrics import scores
from .powerlaw import MAX_EXTRAPOLATION, bootstrap, crossing, fit_power_law
from .results import best_approach1, best_row, of_protocol

log = logging.getLogger(__name__)


def train_subsets(pool: pd.DataFrame, fractions: list[float], seeds: int) -> pd.DataFrame:
    """(fraction, seed, image_id): per fraction and seed, a stratified sample of ``pool``'s images (columns
    image_id, label), each category keeping its share and at least one image. Drawn from the pool sorted by
    image id, so the same study gives the same subsets whatever the order its features come in."""
    pool = pool.sort_values("image_id").reset_index(drop=True)
    rows = []
    for f in fractions:
        for s in range(seeds):
            rng = np.random.default_rng([s, int(round(f * 1000))])
            for _, members in pool.groupby("label", sort=True):
                k = max(1, int(round(f * len(members))))
                rows += [(f, s, i) for i in rng.choice(members["image_id"].to_numpy(), size=k, replace=False)]
    return pd.DataFrame(rows, columns=["fraction", "seed", "image_id"]).sort_values(["fraction", "seed", "image_id"])


def ids_sha1(ids) -> str:
    return hashlib.sha1("\n".join(sorted(map(str, ids))).encode()).hexdigest()


def _a1_trial(config: dict, data: dict) -> None:
    from ray import tune

    t = config["trial"]
    idx = np.flatnonzero(np.isin(data["ids"], t["ids"]))
    project, est = fit_pca_classifier(data["X"][idx], data["y"][idx], data["spec"], data["params"], t["seed"], data["pca"])
    s = scores(data["yte"], est.predict(project(data["Xte"])))
    tune.report({"n_train": len(idx), "accuracy": s["accuracy"], "f1_macro": s["f1_macro"],
                 "train_ids_sha1": ids_sha1(data["ids"][idx]), "skipped": False})


def _a2_trial(config: dict, data: dict) -> None:
    """One Ray Train run (tune's Train V2 pattern: the trial drives the trainer): the fine-tuning method on one
    subset of the train split. finetune_one skips a finished run and resumes an interrupted one."""
    from ray import tune

    from .finetune import finetune_one

    t = config["trial"]
    cfg = StudyConfig.model_validate(data["cfg"])
    run = finetune_one(cfg, data["model"], data["method"], data["manifest"], data["classes"], data["weights"],
                       train_ids=set(t["ids"]), seed=cfg.finetune.seed + t["seed"], out=storage.to_path(t["out"],
                       cfg.storage.options), ray_dir=cfg.study_dir / "curve" / "_ray", light=True)
    meta = json.loads((run.output / "metrics.json").read_text("utf-8"))
    tune.report({"n_train": meta["n_train"], "accuracy": run.metrics["accuracy"], "f1_macro": run.metrics["f1_macro"],
                 "train_ids_sha1": meta["train_ids_sha1"], "skipped": run.skipped,
                 "resumed_at": json.dumps(run.resumed_at)})


def _grid(trainable, data: dict, points: list[dict], resources: dict, label: str, concurrent: int | None,
          tune_dir: Path) -> list[dict]:
    from ray import tune

    if not points:
        return []
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, data=data), resources),
        param_space={"trial": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=label.replace(" ", "-"), storage_path=str(tune_dir), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[progress.tune_callback(label, len(points))]))
    out = []
    for r in tuner.fit():
        t = r.config["trial"]
        if r.error is not None:
            raise LifelogError(f"{label}: the run for fraction {t['fraction']}, seed {t['seed']} failed ({r.error}); "
                               f"rerun `lifelog-ray curve` to resume (finished runs are kept)")
        out.append({"fraction": t["fraction"], "seed": t["seed"], **{k: r.metrics[k] for k in
                    ("n_train", "accuracy", "f1_macro", "train_ids_sha1", "skipped")},
                    "resumed_at": r.metrics.get("resumed_at", "[]")})
    return out


def approaches_to_run(study: Path, asked: str, protocol: str) -> list[int]:
    """1 and/or 2: `auto` is both when the study fine-tuned under this protocol; `2` without fine-tuning is an
    error, `both` without it runs Approach 1 with a warning."""
    ft = study / "finetune" / "results.parquet"
    tuned = ft.exists() and not of_protocol(storage.read_parquet(ft), protocol).empty
    if asked == "1":
        return [1]
    if not tuned:
        why = (f"this study has no fine-tuning results under the {protocol} protocol (run `lifelog-ray finetune"
               f"{' --protocol day' if protocol == 'day' else ''}` first)")
        if asked == "2":
            raise LifelogError(f"curve --approach 2: {why}")
        if asked == "both":
            log.warning("curve --approach both: %s; drawing Approach 1 only", why)
        return [1]
    return [2] if asked == "2" else [1, 2]


CODE_BEARING_KEYS = ("search_space",)


def study_settings(cfg: StudyConfig, section: str, recorded_at: Path) -> StudyConfig:
    """``cfg`` with ``section`` (classify, finetune) as the study ran it (the resolved config the stage wrote at
    ``recorded_at``), changed only where ``cfg`` itself departs from the defaults: `curve --study S` alone
    trains with the study's settings, and `--set finetune.epochs=2` still applies."""
    import yaml

    from .config import load_config

    path = recorded_at / "config.yaml"
    if not path.exists():
        return cfg
    recorded = (yaml.safe_load(path.read_text("utf-8")) or {}).get(section) or {}
    # A study may come from someone else: a path it records to a file that names code (the search space's
    # estimators) is never taken from it. The curve uses this command's own search space (the bundled one
    # unless --config or --set names another).
    recorded = {k: v for k, v in recorded.items() if k not in CODE_BEARING_KEYS}
    default = getattr(StudyConfig(), section).model_dump(mode="json")
    mine = {k: v for k, v in getattr(cfg, section).model_dump(mode="json").items() if v != default.get(k)}
    merged = load_config(None, {}, {f"{section}.{k}": v for k, v in {**recorded, **mine}.items()})
    return cfg.model_copy(update={section: getattr(merged, section)})


@leased("curve")
def run_curve(cfg: StudyConfig) -> pd.DataFrame:
    """The curve of ``cfg.curve``; returns curve.csv's table."""
    from .classify.study import day_splits
    from .runtime import ensure_ray

    # Ray Tune runs each trial in its own folder: the paths the trials use must not be relative
    cfg = rebase_paths(cfg, os.getcwd())
    c, study = cfg.curve, cfg.study_dir
    cfg = study_settings(cfg, "classify", study / "classify")
    approaches = approaches_to_run(study, c.approach, c.protocol)
    ch = best_approach1(study, protocol=c.protocol)
    spec = load_search_space(cfg.classify.search_space, [ch.classifier])[0]
    fs = load_feature_set(study, ch.model, ch.layer, None, splits=day_splits(study) if c.protocol == "day" else None)
    labels = np.asarray(fs.classes)[fs.y["train"]]
    subsets = train_subsets(pd.DataFrame({"image_id": fs.ids["train"].astype(str), "label": labels}), c.fractions,
                            c.seeds)
    d = study / "curve"
    storage.write_df_atomic(subsets.assign(protocol=c.protocol), d / "subsets.parquet")
    groups = {k: g["image_id"].tolist() for k, g in subsets.groupby(["fraction", "seed"])}
    ensure_ray(cfg.ray)
    rows = []
    a1_name = f"{ch.model}/{ch.layer}/{ch.classifier}"
    with storage.scratch_dir(d / "tune") as tune_dir:
        if 1 in approaches:
            data = {"X": fs.X["train"], "y": fs.y["train"], "ids": fs.ids["train"].astype(str), "Xte": fs.X["test"],
                    "yte": fs.y["test"], "spec": spec, "params": ch.params, "pca": cfg.classify.pca}
            points = [{"fraction": f, "seed": s, "ids": ids} for (f, s), ids in groups.items()]
            got = _grid(_a1_trial, data, points, {"cpu": cfg.classify.cpus_per_trial}, "curve approach 1", None, tune_dir)
            rows += [{"approach": 1, "method": a1_name, **r} for r in got]
        if 2 in approaches:
            rows += [{"approach": 2, **r} for r in _approach2(cfg, groups, tune_dir)]
    raw = pd.DataFrame(rows).assign(protocol=c.protocol)
    summary = (raw.groupby(["approach", "method", "protocol", "fraction"])
               .agg(n_train=("n_train", "mean"), accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                    f1_mean=("f1_macro", "mean"), f1_std=("f1_macro", "std"), runs=("seed", "count"))
               .reset_index().fillna({"accuracy_std": 0.0, "f1_std": 0.0}))
    summary = summary[["fraction", "n_train", "accuracy_mean", "accuracy_std", "f1_mean", "f1_std", "runs", "approach",
                       "method", "protocol"]]
    storage.write_df_atomic(raw, d / "curve_runs.parquet")
    storage.write_text_atomic(summary.to_csv(index=False), d / "curve.csv")
    fits, verdict = fit_and_compare(raw)
    _plot_curve(summary, fits, d / "curve.png", c.protocol)
    storage.write_text_atomic(json.dumps({
        "approaches": approaches, "protocol": c.protocol, "fractions": c.fractions, "seeds": c.seeds,
        "model": ch.model, "layer": ch.layer, "classifier": ch.classifier, "params": ch.params,
        "method": next((m for m in summary.loc[summary["approach"] == 2, "method"]), None),
        "runs": {str(a): int((raw["approach"] == a).sum()) for a in approaches},
        "fits": {str(a): f for a, f in fits.items()}, "verdict": verdict}, indent=1, default=str), d / "curve.json")
    return summary


def _approach2(cfg: StudyConfig, groups: dict, tune_dir: Path) -> list[dict]:
    from . import placement
    from .backbones import resolve_weights
    from .finetune import split_column, weight_spec

    c, study = cfg.curve, cfg.study_dir
    ft = of_protocol(storage.read_parquet(study / "finetune" / "results.parquet"), c.protocol)
    if c.method:
        ft = ft[ft["method"] == c.method]
        if ft.empty:
            raise LifelogError(f"curve --method {c.method}: the study has no {c.method} fine-tuning run under the "
                               f"{c.protocol} protocol (run `lifelog-ray finetune --methods {c.method}` first)")
    b = best_row(ft)
    model, method = str(b["model"]), str(b["method"])
    from .finetune import run_dir_name

    cfg = study_settings(cfg, "finetune", study / "finetune" / model / run_dir_name(method, c.protocol))
    f = cfg.finetune.model_copy(update={"protocol": c.protocol})
    run_cfg = cfg.model_copy(update={"finetune": f})
    manifest = storage.read_parquet(study / "manifest.parquet")
    classes = sorted(manifest["label"].unique())
    if split_column(f) not in manifest:
        raise LifelogError(f"{study}/manifest.parquet has no {split_column(f)} column; rerun `lifelog-ray manifest`")
    weights = resolve_weights(weight_spec(f, model, method))
    worker = {"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if f.gpus_per_worker else {})}
    shape = placement.discover()
    placement.check_capacity(shape, worker, f.workers, "curve (fine-tuning)", spare_cpus=0.5)
    # side by side as far as the cluster holds them: each run's workers and one CPU for its data pipeline
    side = int(shape.most("CPU") // (f.workers * f.cpus_per_worker + 1))
    if f.gpus_per_worker:
        side = min(side, int(shape.most("GPU") // (f.workers * f.gpus_per_worker)))
    side = max(1, min(side, len(groups)))
    log.info("curve: %d fine-tuning runs of %s/%s, %d at a time", len(groups), model, method, side)
    out = study / "curve" / "runs"
    points = [{"fraction": fr, "seed": s, "ids": ids,
               "out": str(out / f"a2-{model}-{method}-{c.protocol}-f{fr:g}-s{s}")} for (fr, s), ids in groups.items()]
    data = {"cfg": run_cfg.model_dump(mode="json"), "model": model, "method": method, "manifest": manifest,
            "classes": classes, "weights": weights}
    # the trial only drives its Ray Train run, whose workers hold the resources: no CPU of its own (Ray Tune
    # refuses an empty bundle, hence one byte of memory), so it never keeps a run's workers off a CPU
    got = _grid(_a2_trial, data, points, {"cpu": 0, "memory": 1}, "curve approach 2", side, tune_dir)
    return [{"method": f"{model}/{method}", **r} for r in got]


# --- fits and the verdict -------------------------------------------------------------------------------

def fit_and_compare(raw: pd.DataFrame, rounds: int = 200) -> tuple[dict[int, dict], str]:
    """Per approach, the power-law fit of accuracy against training images (with its spread over seeds), and
    one sentence, computed from the data, on whether and where the curves cross."""
    fits, objs = {}, {}
    for a, g in raw.groupby("approach"):
        f = fit_power_law(g["n_train"].to_numpy(), g["accuracy"].to_numpy())
        if f is not None:
            f = bootstrap(g["n_train"].to_numpy(float), g["accuracy"].to_numpy(float), g["seed"].to_numpy(), f, rounds)
            objs[int(a)] = f
            fits[int(a)] = {"a": f.a, "b": f.b, "c": f.c, "points": f.points, "note": f.note, "spread": f.spread}
        else:
            fits[int(a)] = {"note": "fewer than 3 training-set sizes: no fit (3 parameters)"}
    return fits, verdict(raw, objs, rounds)


def verdict(raw: pd.DataFrame, fits: dict, rounds: int = 200) -> str:
    if set(raw["approach"]) != {1, 2}:
        return "Only Approach 1 ran: there is no fine-tuning curve to compare it with."
    m = raw.groupby(["approach", "fraction"]).agg(n=("n_train", "mean"), acc=("accuracy", "mean")).reset_index()
    one, two = (m[m["approach"] == a].set_index("fraction") for a in (1, 2))
    common = one.index.intersection(two.index)
    gap = (two.loc[common, "acc"] - one.loc[common, "acc"]) * 100
    n_max = float(max(one["n"].max(), two["n"].max()))
    last = common.max()
    if (gap >= 0).all():
        measured = (f"Fine-tuning matches or beats the feature pipeline at every measured size (by {gap.loc[last]:.1f} "
                    f"points at {one.loc[last, 'n']:,.0f} training images).")
    elif (gap < 0).all():
        measured = (f"Fine-tuning stays below the feature pipeline at every measured size, by {-gap.loc[last]:.1f} "
                    f"points at the largest ({one.loc[last, 'n']:,.0f} training images).")
    else:
        flips = [(common[i], common[i + 1]) for i in range(len(common) - 1) if (gap.iloc[i] < 0) != (gap.iloc[i + 1] < 0)]
        lo, hi = flips[-1] if flips else (common[0], common[-1])
        measured = (f"The measured curves cross between {one.loc[lo, 'n']:,.0f} and {one.loc[hi, 'n']:,.0f} training "
                    f"images; at the largest size fine-tuning is {gap.loc[last]:+.1f} points from the feature pipeline.")
    if 1 not in fits or 2 not in fits:
        return measured + " There are too few sizes to fit a power law (3 or more are needed)."
    if gap.loc[last] >= 0:
        return measured
    n_star = crossing(fits[1], fits[2], n_max)
    reach = f"{MAX_EXTRAPOLATION:g}x the largest measured size ({MAX_EXTRAPOLATION * n_max:,.0f} images)"
    if n_star is None:
        return measured + f" The power-law fits do not support a crossing within {reach}: an extrapolation, not a measurement."
    return (measured + f" If the power-law fits hold, fine-tuning would match it at about {n_star:,.0f} training "
            f"images ({n_star / n_max:.1f}x the largest measured size, within {reach}): an extrapolation, not a "
            f"measurement" + (f"; {fits[2].note}" if fits[2].note else "") + ".")


def _plot_curve(summary: pd.DataFrame, fits: dict, path: Path, protocol: str) -> None:
    from .plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {1: "#4e79a7", 2: "#e15759"}
    for (a, method), g in summary.groupby(["approach", "method"]):
        label = f"Approach {a}: {method}"
        ax.errorbar(g["n_train"], 100 * g["accuracy_mean"], yerr=100 * g["accuracy_std"], marker="o", capsize=3,
                    color=colors.get(a), label=label)
        f = fits.get(int(a)) or {}
        if "c" in f:
            n_max = g["n_train"].max()
            seen = np.geomspace(g["n_train"].min(), n_max, 50)
            ahead = np.geomspace(n_max, MAX_EXTRAPOLATION * n_max, 30)
            curve = lambda n, f=f: 100 * (f["a"] - f["b"] * n ** -f["c"])  # noqa: E731
            ax.plot(seen, curve(seen), "--", color=colors.get(a), alpha=0.6)
            ax.plot(ahead, curve(ahead), ":", color=colors.get(a), alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training images (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Data availability ({protocol} split): mean and spread over seeds; fits dashed, "
                 f"extrapolated dotted", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes_atomic(buf.getvalue(), path)
