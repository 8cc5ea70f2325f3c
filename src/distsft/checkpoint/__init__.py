"""Everything around OUTPUT_DIR's checkpoints, on both sides: the complete-or-absent store and its typed
marker, preemption (signals, PREEMPTED, exit 75), the resume decision and its guards, universal
(ZeRO) conversion, save timing, the output-dir lock, the shared-directory check."""
