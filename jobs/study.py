"""Ray job: the whole study (manifest -> extract -> classify -> finetune -> report).

Submit to a running cluster (local `ray start --head`, or the cloud cluster of cluster.yaml):
    ray job submit --working-dir . -- python jobs/study.py --config jobs/configs/sample.yaml
Run locally on a tiny generated lifelog:
    python jobs/study.py --smoke-test
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir ray job submit uploads

from lifelog_ray.jobs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("study", sys.argv[1:]))
