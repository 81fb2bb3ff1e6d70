"""`python -m benchmarks [--quick] [--device cuda] [--json FILE]`: see benchmarks/offline.py."""

import sys

from benchmarks.offline import main

sys.exit(main())
