"""Ray job: the study, or the stages you name (manifest -> extract -> classify -> finetune -> report).

Submit to a local head (`ray start --head`; the job runs in an uploaded copy of the code, so name the venv's
interpreter and the folder the config's relative paths start from):
    ray job submit --working-dir . -- "$PWD/.venv/bin/python" jobs/study.py --config jobs/configs/sample.yaml \
        --base-dir "$PWD"
To the cloud cluster of cluster.yaml (the package installed on every node, data and study on S3/GCS):
    ray job submit --working-dir . -- python jobs/study.py --config ... --stages extract,classify
Run locally on a tiny generated lifelog:
    python jobs/study.py --smoke-test [--stages finetune]
A stage that needs another's output (classify needs features, finetune the manifest) runs it first
when that output is missing; completed stages skip.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir ray job submit uploads

from lifelog_ray.config import load_config, rebase_paths  # noqa: E402
from lifelog_ray.console import QUIET_RAY, Console  # noqa: E402
from lifelog_ray.errors import USER_ERRORS, LifelogError  # noqa: E402
from lifelog_ray.pipeline import format_summary, parse_stages, run_study  # noqa: E402
from lifelog_ray.sample import smoke_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="lifelog-ray job: the study or some of its stages")
    p.add_argument("--config", help="study config YAML (jobs/configs/*.yaml)")
    p.add_argument("--study", help="override output.study")
    p.add_argument("--stages", help="comma list, as `lifelog-ray run --stages` (default: all)")
    p.add_argument("--base-dir", help="the folder relative paths in the config start from (default: the working "
                                      "directory); a local `ray job submit --working-dir .` passes \"$PWD\"")
    p.add_argument("--smoke-test", action="store_true", help="run on a tiny generated lifelog")
    p.add_argument("--wait", action="store_true", help="if another run holds a stage of this study, wait for it "
                                                       "instead of failing (as `lifelog-ray run --wait`)")
    p.add_argument("-v", "--verbose", action="store_true", help="the full log on the console (as `lifelog-ray -v`)")
    args = p.parse_args(argv)
    if not args.smoke_test and not args.config:
        p.error("--config is required (or --smoke-test)")
    # The job log (`ray job logs`, the dashboard) reads like the CLI: stage lines, progress, summaries.
    with Console(verbose=args.verbose) as console:
        quiet = {} if args.verbose else QUIET_RAY
        try:
            stages = parse_stages(args.stages)
            if args.smoke_test:
                cfg = smoke_config(Path(tempfile.mkdtemp(prefix="lifelog-smoke-")), quiet)
            else:
                cfg = load_config(args.config, {"output.study": args.study, "storage.lease_wait": args.wait or None,
                                                **quiet})
                if args.base_dir:
                    if not Path(args.base_dir).is_dir():
                        raise LifelogError(f"--base-dir {args.base_dir}: not a directory")
                    cfg = rebase_paths(cfg, args.base_dir)
            rows = run_study(cfg, stages, console=console)
        except USER_ERRORS as e:
            console.say(f"error: {e}", err=True)
            return 2
        console.say(format_summary(rows, cfg.study_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
