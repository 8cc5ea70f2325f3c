#!/bin/bash
# One node's share of a torchrun job, as an srun task (see sbatch_template.sh):
#   srun bash slurm/torchrun_task.sh [torchrun options] launch/train.py RUN_DIR/run.yaml
# It starts torchrun (with --node_rank from SLURM_NODEID) and forwards the pre-kill signals USR2 and
# TERM to torchrun's workers, which save a checkpoint at the next step and exit. torchrun's agent itself
# ignores both: it has no USR2 handler (it would die at once, taking its workers down), and on TERM it
# gives its workers only 30 s before SIGKILL, less than a large model's checkpoint takes. The workers
# inherit the ignored signals, but distsft's training installs its own handlers for them.
set -u
(
  trap '' TERM USR2
  export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT   # not SIGTERM: leave it ignored
  exec torchrun --node_rank "${SLURM_NODEID:-0}" "$@"
) &
agent=$!
# shellcheck disable=SC2317  # invoked by the traps
forward() {
  echo "torchrun_task: $1: forwarding to the workers of torchrun (pid $agent) on $(hostname)" >&2
  pkill "-$1" -P "$agent" || true
}
trap 'forward USR2' USR2
trap 'forward TERM' TERM
# A trap interrupts `wait`: wait again until torchrun has really exited, then exit with its code.
wait "$agent"; rc=$?
while kill -0 "$agent" 2>/dev/null; do wait "$agent"; rc=$?; done
exit "$rc"
