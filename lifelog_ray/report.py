"""`lifelog-ray report`: one self-contained offline HTML file (inline CSS, images as data URIs, no requests)."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from . import storage
from .errors import LifelogError
from .finetune import run_dir_name
from .html import escape, png_uri, table, thumb
from .lifelog_report import predictions_sections, summaries_quality_section
from .metrics import TABLE_METRICS
from .rejects import read_rejects
from .results import best_row, of_protocol
from .results import ranked as rank

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:2px solid #ddd;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child,td.l{text-align:left}
.best{background:#e6f4e6;font-weight:600}.note{color:#666;font-size:.9rem}
.gallery{display:flex;flex-wrap:wrap;gap:.8rem}.gallery figure{margin:0;width:150px;font-size:.75rem}
.gallery img{width:150px;height:112px;object-fit:cover;border:1px solid #ccc}
.curves img,.cm img{max-width:100%}pre{background:#f7f7f7;padding:1rem;overflow:auto;font-size:.8rem}
.warn{background:#fff4e0;border:1px solid #f0c070;padding:.6rem 1rem}
table.events td.kf{padding:1px}table.events img{width:120px;height:90px;object-fit:cover;display:block}
.filters select,.filters input{margin:0 .6rem 0 .2rem}
"""


def _confusion_png(cm: pd.DataFrame, title: str) -> str:
    from .plotting import pyplot

    plt = pyplot()

    n = len(cm)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
    ax.imshow(cm.to_numpy(), cmap="Blues")
    ax.set_xticks(range(n), cm.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), cm.index, fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm.iat[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return png_uri(buf.getvalue())


def _gallery(preds: pd.DataFrame, manifest: pd.DataFrame, limit: int, options: storage.Options | None = None) -> str:
    wrong = preds[preds["true"] != preds["pred"]].head(limit)
    if wrong.empty:
        return "<p class='note'>No misclassified test images.</p>"
    paths = manifest.set_index("image_id")["path"]
    figs = []
    for _, r in wrong.iterrows():
        uri = thumb(paths.get(r["image_id"], ""), options)
        img = f"<img alt='{escape(r['image_id'])}' src='{uri}'>" if uri else "<div class='note'>(unreadable)</div>"
        figs.append(f"<figure>{img}<figcaption><b>true:</b> {escape(r['true'])}<br><b>predicted:</b> "
                    f"{escape(r['pred'])}<br><span class='note'>{escape(r['image_id'])}</span></figcaption></figure>")
    return f"<div class='gallery'>{''.join(figs)}</div>"


GAP_SENTENCE = ("The gap is how much of the per-image score comes from near-duplicate frames: under the per-image "
                "split almost every test image has a near-copy from the same minute in training, while under the "
                "day split every test image comes from a day the model never saw, as on a new day of a real "
                "lifelog.")


def _protocol_section(results: pd.DataFrame) -> list[str]:
    """Both evaluation protocols side by side, per pipeline, with the gap, when classify ran both."""
    if "protocol" not in results or set(results["protocol"]) != {"image", "day"}:
        return []
    results = pd.concat([of_protocol(results, p) for p in ("image", "day")])
    keys = ["model", "layer", "classifier"]
    wide = (results.pivot_table(index=keys, columns="protocol", values=["accuracy", "f1_macro"]) * 100)
    wide.columns = [f"{metric} ({protocol})" for metric, protocol in wide.columns]
    wide = wide.reset_index()
    wide["accuracy gap"] = wide["accuracy (image)"] - wide["accuracy (day)"]
    wide["f1_macro gap"] = wide["f1_macro (image)"] - wide["f1_macro (day)"]
    wide = wide[keys + ["accuracy (image)", "accuracy (day)", "accuracy gap", "f1_macro (image)", "f1_macro (day)",
                        "f1_macro gap"]].sort_values("accuracy (image)", ascending=False, kind="stable")
    return ["<h2 id='protocols'>Per-image split vs day split (Approach 1)</h2>",
            f"<p class='note'>Test split, percent; gap = per-image minus day. {escape(GAP_SENTENCE)}</p>",
            table(wide)]


def _smoothing_section(results: pd.DataFrame) -> list[str]:
    """Per image beside temporally smoothed, per protocol and pipeline (the companion of Table 3)."""
    if "temporal" not in results or "smoothed" not in set(results["temporal"]):
        return []
    keys = ["protocol", "model", "layer", "classifier"]
    per_image = results[results["temporal"] == "none"].set_index(keys)
    smoothed = results[results["temporal"] == "smoothed"].set_index(keys)
    t = pd.DataFrame({"accuracy (per image)": 100 * per_image["accuracy"],
                      "accuracy (smoothed)": 100 * smoothed["accuracy"],
                      "f1_macro (per image)": 100 * per_image["f1_macro"],
                      "f1_macro (smoothed)": 100 * smoothed["f1_macro"],
                      "smoother (chosen on validation)": smoothed["smoothing"].replace("", "none better")})
    t["f1_macro gain"] = t["f1_macro (smoothed)"] - t["f1_macro (per image)"]
    return ["<h2 id='smoothing'>Temporal smoothing (companion to Table 3)</h2>",
            "<p class='note'>Test split, percent. Each pipeline's class probabilities are smoothed along each "
            "day's time-ordered test images (only images of the same split, at most "
            "<code>classify.temporal_max_gap_s</code> apart); the smoother is the one that scored best on "
            "validation, or none.</p>", table(t.reset_index())]


def _timeline_section(results: pd.DataFrame, preds: pd.DataFrame, manifest: pd.DataFrame,
                      options: storage.Options | None, days: int = 3) -> list[str]:
    """A few test days as strips: the true activity, the best pipeline's per-image and smoothed labels.
    Under the day protocol (when it ran) a test day is whole; under the per-image one it is sparse."""
    from .timeline import day_timeline_png, thumbnails_of

    protocol = "day" if "protocol" in results and "day" in set(results["protocol"]) else "image"
    rows = of_protocol(results, protocol)
    if rows.empty:
        return []
    b = best_row(rows)
    mine = preds[(preds["model"] == b["model"]) & (preds["layer"] == b["layer"]) & (preds["classifier"] == b["classifier"])]
    if "protocol" in mine:
        mine = mine[mine["protocol"] == protocol]
    per_image = mine[mine["temporal"] == "none"] if "temporal" in mine else mine
    smoothed = (mine[mine["temporal"] == "smoothed"] if "temporal" in mine else per_image)
    t = (per_image[["image_id", "true", "pred"]]
         .merge(smoothed[["image_id", "pred"]].rename(columns={"pred": "smoothed"}), on="image_id", how="left")
         .merge(manifest[["image_id", "day", "timestamp", "path"]].astype({"image_id": str}), on="image_id"))
    if t.empty:
        return []
    classes = sorted(set(t["true"]) | set(t["pred"]))
    smoothing = ""
    smoothing_row = of_protocol(results, protocol, "smoothed")
    if len(smoothing_row):
        hit = smoothing_row[(smoothing_row["model"] == b["model"]) & (smoothing_row["layer"] == b["layer"])
                            & (smoothing_row["classifier"] == b["classifier"])]
        smoothing = str(hit["smoothing"].iloc[0]) if len(hit) else ""
    out = [f"<h2 id='timelines'>Test days as timelines ({escape(protocol)} protocol)</h2>",
           f"<p class='note'>{escape(b['model'])} / {escape(b['layer'])} / {escape(b['classifier'])}; smoothed with "
           f"{escape(smoothing or 'no smoother (none beat per-image labels on validation)')}. Each image is a bar "
           "until the next one; colours are categories.</p>"]
    busiest = t["day"].value_counts().sort_index().sort_values(ascending=False, kind="stable").index[:days]
    for day in sorted(busiest):
        d = t[t["day"] == day]
        png = day_timeline_png(d, [("true", "true"), ("per image", "pred"), ("smoothed", "smoothed")], classes,
                               f"{day}: {len(d)} test images", thumbnails_of(d, options=options))
        out.append(f"<div class='timeline'><img alt='timeline {escape(str(day))}' src='{png_uri(png)}'></div>")
    return out


def build_report(study: str | Path, gallery_size: int = 24, options: storage.Options | None = None) -> Path:
    """``options``: storage options for URIs (the study's own config supplies them when not given)."""
    study = storage.to_path(study, options)
    if not (study / "manifest.parquet").exists():
        raise LifelogError(f"{study}: not a study directory (no manifest.parquet)")
    manifest = storage.read_parquet(study / "manifest.parquet")
    parts = [f"<h1>Lifelog activity study: {escape(study.name)}</h1>",
             f"<p class='note'>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by lifelog-ray from "
             f"{escape(study if storage.is_remote(study) else study.resolve())}.</p>"]
    cfg_text = (study / "config.yaml").read_text("utf-8") if (study / "config.yaml").exists() else ""
    if options is None and cfg_text:  # the images' storage options, as the study was run
        options = ((yaml.safe_load(cfg_text) or {}).get("storage") or {}).get("options")
    if "weights: none" in cfg_text:
        parts.append("<p class='warn'>This study used randomly initialised backbones (<code>weights: none</code>), "
                     "not ImageNet weights: the figures test the pipeline, not the paper's transfer learning.</p>")

    # Dataset: Table 2 and the accounting.
    parts.append("<h2 id='dataset'>Dataset (Table 2)</h2>")
    if (study / "categories.csv").exists():
        cats = storage.read_csv(study / "categories.csv")
        parts.append("<p class='note'>train/val/test: the paper's per-image split; *_day: every image of a day "
                     "in one split (images of the same minute never straddle train and test).</p>" + table(cats))
        from .ingest import short_of_day_splits

        short = short_of_day_splits(cats)
        if len(short):
            parts.append("<p class='warn'>Under the day split, " + ", ".join(escape(c) for c in short["category"])
                         + " cannot reach all three splits: their images lie on too few days.</p>")
    rej = read_rejects(study)
    if len(rej):
        counts = rej.groupby(["stage", "reason"]).size().reset_index(name="images")
        parts.append("<p>Rejected inputs (every input row is in the manifest or here):</p>" + table(counts))

    # Approach 1.
    cls_dir = study / "classify"
    best_rows = []
    if (cls_dir / "results.parquet").exists():
        from .classify.study import TABLE_BLOCKS, order_layers

        all_res = storage.read_parquet(cls_dir / "results.parquet")
        res = of_protocol(all_res)
        if res.empty:  # a study run with the day protocol only
            res = all_res
        parts.append("<h2 id='table3'>Approach 1: pre-trained features + classifiers (Table 3)</h2>")
        parts.append("<p class='note'>Test split, percent; precision, recall and F1 are macro averages. "
                     "Each cell is the classifier's best grid point on the validation split.</p>")
        for title, col in TABLE_BLOCKS:
            wide = res.pivot_table(index=["model", "layer"], columns="classifier", values=col).reset_index()
            wide["order"] = wide["layer"].map({la: i for i, la in enumerate(order_layers(list(wide["layer"])))})
            wide = wide.sort_values(["model", "order"]).drop(columns="order")
            clf_cols = [c for c in wide.columns if c not in ("model", "layer")]
            wide[clf_cols] = wide[clf_cols] * 100
            parts.append(f"<h3>{escape(title)}</h3>" + table(wide, highlight_max=clf_cols))
        b = best_row(res)
        best_rows.append({"approach": "1 (features + classifier)", "model": b["model"],
                          "variant": f"{b['layer']} + {b['classifier']}", "accuracy": 100 * b["accuracy"],
                          "f1_macro": 100 * b["f1_macro"]})
        tag = f"{b['model']}__{b['layer']}__{b['classifier']}"
        cm_path = cls_dir / "confusion" / f"{tag}.csv"
        if cm_path.exists():
            parts.append(f"<h3>Confusion matrix of the best pipeline ({escape(tag.replace('__', ' / '))})</h3>"
                         f"<div class='cm'><img alt='confusion {escape(tag)}' src='{_confusion_png(storage.read_csv(cm_path, index_col=0), tag)}'></div>")
        if (cls_dir / "predictions.parquet").exists():
            preds = of_protocol(storage.read_parquet(cls_dir / "predictions.parquet"), str(res["protocol"].iloc[0])
                                if "protocol" in res else "image")
            # The best pipeline's mistakes; if it made none, those of the best pipeline that made some.
            ranked = rank(res)
            chosen, note = None, ""
            for _, r in ranked.iterrows():
                p = preds[(preds["model"] == r["model"]) & (preds["layer"] == r["layer"])
                          & (preds["classifier"] == r["classifier"])]
                if (p["true"] != p["pred"]).any():
                    chosen = p
                    name = f"{r['model']} / {r['layer']} / {r['classifier']}"
                    note = (f"<p class='note'>Mistakes of {escape(name)}" +
                            (" (the best pipeline made none)." if r is not ranked.iloc[0] and
                             (r["model"], r["layer"], r["classifier"]) != (b["model"], b["layer"], b["classifier"])
                             else ".") + "</p>")
                    break
            parts.append("<h3 id='misclassified'>Misclassified test images (Figure 3)</h3>" + note +
                         (_gallery(chosen, manifest, gallery_size, options) if chosen is not None
                          else "<p class='note'>No pipeline misclassified a test image.</p>"))

        parts += _protocol_section(all_res) + _smoothing_section(all_res)
        if (cls_dir / "predictions.parquet").exists():
            parts += _timeline_section(all_res, storage.read_parquet(cls_dir / "predictions.parquet"), manifest, options)

    # Approach 2.
    ft_dir = study / "finetune"
    if (ft_dir / "results.parquet").exists():
        ft_all = storage.read_parquet(ft_dir / "results.parquet")
        ft = of_protocol(ft_all)
        if ft.empty:  # fine-tuned under the day protocol only
            ft = ft_all
        ft = ft.assign(run_dir=[run_dir_name(m, p) for m, p in zip(ft["method"], ft.get("protocol", ["image"] * len(ft)))])
        parts.append("<h2 id='table4'>Approach 2: fine-tuning (Table 4)</h2>")
        t4 = ft[["model", "method", *TABLE_METRICS, "epochs", "best_epoch"]].copy()
        t4["method"] = t4["method"].str.upper()
        for c in TABLE_METRICS:
            t4[c] = 100 * t4[c]
        parts.append(table(t4, highlight_max=["accuracy", "f1_macro"]))
        b = best_row(ft)
        best_rows.append({"approach": "2 (fine-tuning)", "model": b["model"], "variant": b["method"].upper(),
                          "accuracy": 100 * b["accuracy"], "f1_macro": 100 * b["f1_macro"]})
        parts.append("<h3 id='curves'>Learning curves (Figure 2)</h3><div class='curves'>")
        for _, r in ft.iterrows():
            png = ft_dir / r["model"] / r["run_dir"] / "learning_curves.png"
            if png.exists():
                parts.append(f"<img alt='learning curves {escape(r['model'])} {escape(r['method'])}' src='{png_uri(png.read_bytes())}'>")
        parts.append("</div>")
        for _, r in ft.iterrows():
            cm_path = ft_dir / r["model"] / r["run_dir"] / "confusion.csv"
            if cm_path.exists():
                title = f"{r['model']} {r['method'].upper()}"
                parts.append(f"<div class='cm'><img alt='confusion {escape(title)}' "
                             f"src='{_confusion_png(storage.read_csv(cm_path, index_col=0), title)}'></div>")

    if best_rows:
        parts.insert(3, "<h2 id='best'>Best model per approach</h2>" + table(pd.DataFrame(best_rows)))
        comp = []
        if (cls_dir / "results.parquet").exists():
            r1 = of_protocol(storage.read_parquet(cls_dir / "results.parquet")).groupby("model")["accuracy"].max()
            comp += [{"approach": "1", "model": m, "best accuracy": 100 * v} for m, v in r1.items()]
        if (ft_dir / "results.parquet").exists():
            r2 = of_protocol(storage.read_parquet(ft_dir / "results.parquet")).groupby("model")["accuracy"].max()
            comp += [{"approach": "2", "model": m, "best accuracy": 100 * v} for m, v in r2.items()]
        parts.append("<h2 id='vgg16-vs-vgg19'>VGG16 vs VGG19</h2>" + table(pd.DataFrame(comp)))

    parts += summaries_quality_section(
        storage.read_parquet(cls_dir / "results.parquet") if (cls_dir / "results.parquet").exists() else None,
        storage.read_parquet(ft_dir / "results.parquet") if (ft_dir / "results.parquet").exists() else None)
    parts += predictions_sections(study, options)
    parts += _audit_section(study, options) + _curve_section(study)
    if cfg_text:
        parts.append(f"<h2 id='config'>Resolved config</h2><pre>{escape(cfg_text)}</pre>")
    doc = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lifelog-ray report: {escape(study.name)}"
           f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = study / "report" / "index.html"
    storage.write_text_atomic(doc, out)
    storage.write_text_atomic(json.dumps(best_rows, indent=1, default=float), study / "report" / "summary.json")
    return out


def _audit_section(study: Path, options: storage.Options | None) -> list[str]:
    """The label-noise audit, from what `audit` wrote: audit.json, per-category noise, suspects, rerun."""
    d = study / "audit"
    if not (d / "audit.json").exists():
        return []
    meta = json.loads((d / "audit.json").read_text("utf-8"))
    issues = storage.read_parquet(d / "label_issues.parquet")
    per_class = storage.read_csv(d / "per_category_noise.csv")
    figs = []
    for _, r in issues.head(16).iterrows():
        uri = thumb(r["path"], options)
        img = f"<img alt='{escape(r['image_id'])}' src='{uri}'>" if uri else ""
        figs.append(f"<figure>{img}<figcaption><b>given:</b> {escape(r['given_label'])}<br><b>suggested:</b> "
                    f"{escape(r['suggested_label'])}<br>score {r['score']:.3f}</figcaption></figure>")
    pipeline = f"{escape(meta['model'])}/{escape(meta['layer'])} + {escape(meta['classifier'])}"
    out = [f"<h2 id='audit'>Label-noise audit</h2><p class='note'>Out-of-fold probabilities from {pipeline}, "
           f"ranked with confident learning (cleanlab). {meta['issues']} of {meta['images']} labels flagged. Test "
           f"labels are never altered.</p>"
           + table(per_class[["category", "Label Issues", "Label Noise", "Label Quality Score"]])
           + f"<h3>Top suspects</h3><div class='gallery'>{''.join(figs)}</div>"]
    if (d / "rerun.csv").exists():
        pct = storage.read_csv(d / "rerun.csv")
        for c in TABLE_METRICS:
            pct[c] = (100 * pct[c]).round(2)
        out.append("<h3 id='audit-rerun'>Before / after removing flagged training images</h3><p class='note'>"
                   f"{pipeline} refitted with the same parameters. Only training images were removed; the test split "
                   "and every label are unchanged, so both rows are scored against the same, possibly noisy, test "
                   "labels.</p>" + table(pct))
    return out


def _curve_section(study: Path) -> list[str]:
    """The data-availability curve, from what `curve` wrote: curve.json, curve.csv and curve.png."""
    d = study / "curve"
    if not (d / "curve.json").exists():
        return []
    meta = json.loads((d / "curve.json").read_text("utf-8"))
    img = (f"<img alt='data-availability curve' src='{png_uri((d / 'curve.png').read_bytes())}'>"
           if (d / "curve.png").exists() else "")
    runs = meta.get("runs") or {}
    parts = [f"Approach 1: {escape(meta['model'])}/{escape(meta['layer'])} + {escape(meta['classifier'])}"]
    if meta.get("method"):
        parts.append(f"Approach 2: {escape(meta['method'])}")
    fits = []
    for a, f in (meta.get("fits") or {}).items():
        if "c" in f:
            spread = f.get("spread") or {}
            c = (f"exponent c = {f['c']:.2f}" + (f" (seeds: {spread['c'][0]:.2f}-{spread['c'][1]:.2f})" if "c" in spread
                                                 else "") + f", ceiling a = {100 * f['a']:.1f} %")
            fits.append(f"Approach {escape(a)}: accuracy = a - b n<sup>-c</sup>, {c}" + (f"; {escape(f['note'])}"
                                                                                         if f.get("note") else ""))
        else:
            fits.append(f"Approach {escape(a)}: {escape(f.get('note', 'no fit'))}")
    return [f"<h2 id='curve'>Data-availability curve</h2><p class='note'>{'; '.join(parts)}, each trained on the same "
            f"stratified fractions of the {escape(meta.get('protocol', 'image'))} train split ({meta['seeds']} seed(s) "
            f"each, {', '.join(f'{n} runs of approach {a}' for a, n in runs.items())}), scored on the fixed test "
            f"split. Error bars: one standard deviation over seeds.</p>",
            f"<p><b>{escape(meta.get('verdict', ''))}</b></p>", img,
            "<p class='note'>" + "<br>".join(fits) + "</p>" if fits else "", table(storage.read_csv(d / "curve.csv"))]
