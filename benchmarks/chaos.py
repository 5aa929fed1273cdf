"""Chaos soak: `lifelog-ray extract` SIGKILLed at random moments, resumed, and raced by second runs.

    .venv/bin/python benchmarks/chaos.py                  # 10 kills on ~300 sample images
    .venv/bin/python benchmarks/chaos.py --kills 3 --images-per-day 20 --days 4

Each round extracts a fresh copy of one study through the real CLI (a subprocess starting its own Ray).
While a round runs, the soak kills, at random moments, either the driver with its process group (the
machine going away) or one model actor (Ray replaces it), and now and then starts a second `extract`
on the same study, which must be refused (exit 2, holder named) or, with --wait, queue behind it.
After every kill it checks what a plain reader sees: `pandas.read_parquet` of each layer folder holds
only rows of units whose marker is written, each image once. When a round completes it checks exactly
once: manifest = feature rows + extract rejects per layer, no duplicate, no orphan file, no staging or
lease left behind. Wasted work is the rows a killed run had extracted but not published (found in its
staging or unmarked, deleted by the next run). Writes benchmarks/results/chaos.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from lifelog_ray.local_cluster import kill_one_below, kill_tree  # noqa: E402

LAYERS = ["fc2", "predictions"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lifelog_ray", *args]


def marked(model_dir: Path) -> dict[str, list[str]]:
    """unit -> its image ids with features, from the completion markers."""
    out = {}
    for f in sorted((model_dir / "_units").glob("*.json")):
        m = json.loads(f.read_text())
        rejected = {r["image_id"] for r in m["rejects"]}
        out[m["unit"]] = [i for i in m["image_ids"] if i not in rejected]
    return out


def reader_view(model_dir: Path, max_unmarked: int = 4) -> list[str]:
    """What a plain reader sees: a problem per layer, or nothing. Whole units only: the marked units' rows, plus
    the files of units a kill caught between their publication and their marker (extract runs at most 2
    publishing tasks per model actor, and at least 4, at once), each one unit of one day sharing no image."""
    import pandas as pd

    expected = sorted(i for ids in marked(model_dir).values() for i in ids)
    listed = {p for f in (model_dir / "_units").glob("*.json") for p in json.loads(f.read_text())["parts"]}
    problems = []
    for layer in LAYERS:
        d = model_dir / layer
        unmarked = [f for f in d.rglob("*.parquet") if f.stem not in listed]
        if len(unmarked) > max_unmarked:
            problems.append(f"{layer}: {len(unmarked)} files of units never marked done")
        extra = []
        for f in unmarked:
            rows = pd.read_parquet(f, columns=["image_id", "day"])
            if rows["day"].nunique() != 1:
                problems.append(f"{layer}: unmarked file {f.name} holds rows of several days")
            extra += rows["image_id"].tolist()
        if len(set(extra)) != len(extra) or set(extra) & set(expected):
            problems.append(f"{layer}: a row in two units")
        ids = sorted(pd.read_parquet(d, columns=["image_id"])["image_id"]) if any(d.rglob("*.parquet")) else []
        if ids != sorted(expected + extra):
            problems.append(f"{layer}: the reader sees {len(ids)} rows, the marked units hold {len(expected)}")
    return problems


def leftover_rows(model_dir: Path) -> int:
    """Rows a dead run extracted that the next run will delete: its staging plus unmarked published files."""
    import pyarrow.parquet as pq

    layer = LAYERS[0]
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in (model_dir / "_staging").glob(f"*/{layer}/*.parquet"))
    listed = {p for f in (model_dir / "_units").glob("*.json") for p in json.loads(f.read_text())["parts"]}
    n += sum(pq.ParquetFile(f).metadata.num_rows for f in (model_dir / layer).rglob("*.parquet") if f.stem not in listed)
    return n


def holds_lease(study: Path, pid: int) -> bool:
    """Has the run ``pid`` taken the extract lease (so it is past start-up and owns the study)?"""
    try:
        return json.loads((study / "_leases" / "extract-vgg19.json").read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def final_check(study: Path) -> list[str]:
    from lifelog_ray.extract import accounting

    model_dir = study / "features" / "vgg19"
    problems = reader_view(model_dir)
    for layer, a in accounting(study, "vgg19", LAYERS).items():
        if a["features"] != a["unique"]:
            problems.append(f"{layer}: duplicates")
        if a["manifest"] != a["features"] + a["rejects"]:
            problems.append(f"{layer}: manifest {a['manifest']} != features {a['features']} + rejects {a['rejects']}")
    if leftover_rows(model_dir):
        problems.append("orphan rows left after a complete run")
    if (model_dir / "_staging").exists():
        problems.append("staging left after a complete run")
    if list((study / "_leases").glob("extract*.json")):
        problems.append("a lease left after a complete run")
    return problems


def soak(args: argparse.Namespace) -> dict:
    from lifelog_ray.sample import write_sample

    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lifelog-chaos-"))
    lifelog, study = work / "lifelog", work / "study"
    write_sample(lifelog, seed=args.seed, days=args.days, images_per_day=args.images_per_day, image_size=(96, 72))
    cfg_file = work / "chaos.yaml"
    cfg_file.write_text(f"extract:\n  unit_size: {args.unit_size}\n  batch_size: 4\nray:\n  progress_bars: false\n"
                        f"storage:\n  lease_timeout_s: {args.lease_timeout}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base = ["--study", str(study), "--config", str(cfg_file), "--ray-address", "local"]
    subprocess.run(cli("manifest", "--root", str(lifelog), "--labels", str(lifelog / "labels.csv"), *base),
                   check=True, capture_output=True, env=env, timeout=300)
    manifest = study / "manifest.parquet"
    pristine = work / "manifest.parquet"
    shutil.copy(manifest, pristine)
    extract = cli("extract", "--weights", "none", "--image-size", str(args.image_size),
                  "--layers", ",".join(LAYERS), *base)
    model_dir = study / "features" / "vgg19"
    stats = {"kills": {"driver": 0, "actor": 0}, "second_runs": {"refused": 0, "queued_and_finished": 0,
                                                                 "ran_alone": 0},
             "rounds": 0, "runs": 0, "wasted_images": 0, "problems": [], "events": []}
    t_start = time.time()
    kills_left = args.kills
    while True:
        stats["rounds"] += 1
        shutil.rmtree(study / "features", ignore_errors=True)
        shutil.rmtree(study / "_leases", ignore_errors=True)
        shutil.copy(pristine, manifest)
        while True:  # one round: run, maybe kill, rerun, until a run completes
            stats["runs"] += 1
            proc = subprocess.Popen(extract, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            stats["events"].append(f"{time.time() - t_start:7.1f}s round {stats['rounds']}: run pid {proc.pid}")
            plan = None
            if kills_left:
                plan = {"what": "driver" if rng.random() < args.driver_share else "actor",
                        "after_units": rng.randint(0, 2), "delay": rng.uniform(0, 2.0)}
            second = rng.random() < args.second_run_share
            waiter = None  # a colleague's `extract --wait` queued behind this run: a Popen, so the loop (and its kill) goes on
            killed = False
            start_units = len(marked(model_dir)) if (model_dir / "_units").exists() else 0
            deadline = time.time() + args.run_timeout
            while proc.poll() is None and time.time() < deadline:
                started = holds_lease(study, proc.pid)
                if second and started:  # a colleague's same command, while this one holds the study
                    second = False
                    if rng.random() < 0.5:
                        waiter = subprocess.Popen(extract + ["--wait"], env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, start_new_session=True)
                        stats["events"].append(f"{time.time() - t_start:7.1f}s   second run --wait: queued")
                    else:  # refused before any Ray work: seconds, so it may block the loop
                        other = subprocess.run(extract, env=env, capture_output=True, text=True,
                                               timeout=args.run_timeout)
                        stats["events"].append(f"{time.time() - t_start:7.1f}s   second run: exit {other.returncode}")
                        if other.returncode == 2 and "already running" in other.stderr:
                            stats["second_runs"]["refused"] += 1
                        elif other.returncode == 0:
                            stats["second_runs"]["ran_alone"] += 1  # the first had finished or died first
                        else:
                            stats["problems"].append(f"second run: exit {other.returncode}: {other.stderr[-500:]}")
                if plan and started:
                    n_units = len(marked(model_dir)) - start_units
                    if n_units >= plan["after_units"]:
                        time.sleep(plan["delay"])
                        if proc.poll() is not None:
                            break
                        stats["events"].append(f"{time.time() - t_start:7.1f}s   kill {plan['what']}")
                        if plan["what"] == "driver":
                            if waiter is not None:  # held while the dead run's leftovers are looked at below
                                os.kill(waiter.pid, signal.SIGSTOP)
                            kill_tree(proc.pid)  # the driver and its local Ray at once, as a machine goes away
                            killed = True
                        elif kill_one_below(proc.pid, "FeatureExtractor"):  # one model actor of this run's Ray
                            stats["kills"]["actor"] += 1
                            kills_left -= 1
                        plan = None
                        if killed:
                            break
                time.sleep(0.05)
            if proc.poll() is None and not killed:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if waiter is not None:
                    os.killpg(waiter.pid, signal.SIGKILL)
                stats["problems"].append("a run exceeded --run-timeout")
                return stats
            proc.wait()
            out = proc.stdout.read().decode(errors="replace")
            if killed:
                stats["kills"]["driver"] += 1
                kills_left -= 1
                time.sleep(0.5)  # the killed Ray's processes exit
                stats["problems"] += [f"after a kill: {p}" for p in reader_view(model_dir)]
                stats["wasted_images"] += leftover_rows(model_dir)
            if waiter is not None:  # it takes the lease when the first run ends, or over from the killed one
                if killed:
                    os.kill(waiter.pid, signal.SIGCONT)
                try:
                    waited = waiter.communicate(timeout=args.run_timeout)[0].decode(errors="replace")
                except subprocess.TimeoutExpired:
                    os.killpg(waiter.pid, signal.SIGKILL)
                    stats["problems"].append("a queued run exceeded --run-timeout")
                    return stats
                stats["events"].append(f"{time.time() - t_start:7.1f}s   second run --wait: exit {waiter.returncode}")
                if waiter.returncode != 0:
                    stats["problems"].append(f"second run --wait: exit {waiter.returncode}: {waited[-500:]}")
                    return stats
                stats["second_runs"]["queued_and_finished"] += 1
                if killed:  # the queued run took the dead run's lease over and completed the study
                    stats["problems"] += [f"round {stats['rounds']}: {p}" for p in final_check(study)]
                    break
            if killed:
                continue
            if proc.returncode != 0:
                stats["problems"].append(f"run exit {proc.returncode}: {out[-800:]}")
                return stats
            stats["problems"] += [f"round {stats['rounds']}: {p}" for p in final_check(study)]
            break
        if kills_left <= 0:
            break
    stats["images"] = int(__import__("pandas").read_parquet(pristine).shape[0])
    stats["wall_s"] = round(time.time() - t_start, 1)
    stats["exactly_once"] = not stats["problems"]
    stats["kills_survived"] = stats["kills"]["driver"] + stats["kills"]["actor"]
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--days", type=int, default=8)
    ap.add_argument("--images-per-day", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=64, help="VGG input side: sets how long a run lasts")
    ap.add_argument("--unit-size", type=int, default=8)
    ap.add_argument("--driver-share", type=float, default=0.6, help="share of kills aimed at the driver")
    ap.add_argument("--second-run-share", type=float, default=0.3, help="share of runs raced by a second run")
    ap.add_argument("--lease-timeout", type=float, default=60.0)
    ap.add_argument("--run-timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the lifelog and study here (default: a temp folder, removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chaos.json"))
    args = ap.parse_args()
    stats = soak(args)
    stats["args"] = vars(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stats, indent=1))
    print(json.dumps({k: v for k, v in stats.items() if k != "args"}, indent=1))
    return 0 if stats.get("exactly_once") else 1


if __name__ == "__main__":
    sys.exit(main())
