"""Pure planning: the batch arithmetic and steps, the plan report, the memory and checkpoint-size
estimates. Runs anywhere (the CLI, the launcher, the ranks); no torch at import."""
