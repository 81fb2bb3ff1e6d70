"""Where the demo's training scripts read and write, and how many threads they use; the training itself is
server.train's (the one loop `promptserve train` runs too)."""

from __future__ import annotations

from server.demo import ASSETS_DIR
from server.engine.default_backbone import PRETRAINED_BACKBONE_DIR

BACKBONE_DIR = PRETRAINED_BACKBONE_DIR
TASKS_DIR = ASSETS_DIR / "tasks"
DEFAULT_THREADS = 1  # two threads gave the same weights wherever compared, but thrash (20x slower) on a busy 2-core box
