"""Ray job: the study, or the stages you name (manifest -> extract -> classify -> finetune -> report).

Submit to a running cluster (local `ray start --head`, or the cloud cluster of cluster.yaml):
    ray job submit --working-dir . -- python jobs/study.py --config jobs/configs/sample.yaml
    ray job submit --working-dir . -- python jobs/study.py --config ... --stages extract,classify
Run locally on a tiny generated lifelog:
    python jobs/study.py --smoke-test [--stages finetune]
A stage that needs another's output (classify needs features, finetune the manifest) runs it first
when that output is missing; completed stages skip.
"""

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir ray job submit uploads

from lifelog_ray.config import load_config  # noqa: E402
from lifelog_ray.errors import USER_ERRORS  # noqa: E402
from lifelog_ray.pipeline import format_summary, parse_stages, run_study  # noqa: E402
from lifelog_ray.sample import smoke_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="lifelog-ray job: the study or some of its stages")
    p.add_argument("--config", help="study config YAML (jobs/configs/*.yaml)")
    p.add_argument("--study", help="override output.study")
    p.add_argument("--stages", help="comma list, as `lifelog-ray run --stages` (default: all)")
    p.add_argument("--smoke-test", action="store_true", help="run on a tiny generated lifelog")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.smoke_test and not args.config:
        p.error("--config is required (or --smoke-test)")
    try:
        stages = parse_stages(args.stages)
        if args.smoke_test:
            cfg = smoke_config(Path(tempfile.mkdtemp(prefix="lifelog-smoke-")))
        else:
            cfg = load_config(args.config, {"output.study": args.study})
        rows = run_study(cfg, stages)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(rows, cfg.study_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
