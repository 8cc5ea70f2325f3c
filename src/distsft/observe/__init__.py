"""What a run shows: metrics and their sinks (JSONL, TensorBoard, W&B) written by rank 0, one progress
display, plots, MFU."""
