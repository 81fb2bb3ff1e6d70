"""promptserve: one frozen model serving many prompt-learning tasks in one batch."""

from importlib.metadata import version

__version__ = version("promptserve")  # pyproject.toml's, the one place it is written
