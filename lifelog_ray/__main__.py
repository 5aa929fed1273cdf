"""`python -m lifelog_ray ...` is the `lifelog-ray` command."""

import sys

from .cli import main

sys.exit(main())
