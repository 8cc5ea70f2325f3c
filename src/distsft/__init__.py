"""distsft: one YAML run spec to a supervised fine-tuning job, locally or on SLURM."""

__version__ = "0.1.0"
