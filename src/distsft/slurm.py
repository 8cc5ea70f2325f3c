"""Alias kept for jobs queued before the layout change: submitit pickled `distsft.slurm.RankTask` by
module path, and unpickles it from here when such a job starts. New jobs pickle distsft.launch.slurm."""

from distsft.launch.slurm import RankTask  # noqa: F401
