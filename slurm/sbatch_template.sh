#!/bin/bash
# Plain sbatch script for multi-node training without submitit: one torchrun per node, started by srun.
# Edit the #SBATCH lines and the variables below, then: sbatch slurm/sbatch_template.sh
# (#SBATCH lines are read by sbatch before the shell runs, so they cannot use shell variables.)
#
#SBATCH --job-name=distsft
#SBATCH --nodes=2                  # EDIT: number of nodes
#SBATCH --gpus-per-node=8          # EDIT: GPUs per node (drop this line on a CPU-only cluster)
#SBATCH --ntasks-per-node=1        # one torchrun per node; torchrun starts one worker per GPU
#SBATCH --cpus-per-task=64         # EDIT: the node's CPUs for its ranks (without it: 1 core for all of them)
#SBATCH --mem=0                    # all of the node's memory (whole nodes); or e.g. --mem=480G on shared ones
#SBATCH --time=04:00:00            # EDIT: wall time
#SBATCH --partition=debug          # EDIT: partition
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append         # a requeued job keeps its id: append, do not truncate its log
# USR2 goes to this batch shell (B:) 120 s before the time limit. Not to the job step: torchrun has
# no USR2 handler and would die at once, taking its workers down without a checkpoint.
#SBATCH --signal=B:USR2@120
#SBATCH --requeue                  # allow `scontrol requeue` (below) and requeue after node failure

RUN_DIR=${RUN_DIR:-runs/my-run}    # EDIT: folder holding run.yaml; checkpoints go there, resume: auto finds them
GPUS=${SLURM_GPUS_ON_NODE:-8}      # EDIT the fallback to match --gpus-per-node
MAX_REQUEUES=3                     # give up after this many time-limit requeues

# The first node of the allocation hosts the rendezvous; every node resolves it by name.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# A port derived from the job id: two jobs sharing a node do not collide, a requeued job keeps it. It
# stays below the ephemeral range (32768+). This shell runs on the first node, which hosts the
# rendezvous: a port already listening there is skipped (said in the log) instead of failing later.
MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000))
while (exec 3<>"/dev/tcp/127.0.0.1/$MASTER_PORT") 2>/dev/null; do
    echo "port $MASTER_PORT is in use on $(hostname); trying $((MASTER_PORT + 1))"
    MASTER_PORT=$((MASTER_PORT + 1))
done
# Each worker's share of the task's CPUs (torchrun would give each only 1 OpenMP thread).
OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$GPUS} / GPUS > 0 ? ${SLURM_CPUS_PER_TASK:-$GPUS} / GPUS : 1 ))
export MASTER_ADDR MASTER_PORT GPUS RUN_DIR OMP_NUM_THREADS
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES nodes x $GPUS GPUs, master $MASTER_ADDR:$MASTER_PORT"

# On USR2: USR2 to the training step. Each node's torchrun_task.sh forwards it to the workers (torchrun's
# agent ignores it), which save one checkpoint at the same step and exit; torchrun then exits. (TERM to
# torchrun would give the workers 30 s; killing srun would SIGKILL them after KillWait.)
# Then requeue: the job keeps its id and resumes from the latest checkpoint in RUN_DIR.
requeue=0
# shellcheck disable=SC2317  # invoked by the trap
on_usr2() {
    ((requeue)) && return
    echo "USR2: time limit near, stopping training to requeue"
    requeue=1
    scancel --signal=USR2 "$SLURM_JOB_ID"
}
trap on_usr2 USR2

# torchrun_task.sh adds --node_rank from the task's own SLURM_NODEID.
srun --kill-on-bad-exit=1 bash slurm/torchrun_task.sh --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py "$RUN_DIR/run.yaml" &
SRUN_PID=$!
# Running srun in the background lets the trap fire at once; a trap interrupts `wait`, so wait again
# until srun has really exited.
wait "$SRUN_PID"; rc=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; rc=$?; done

if ((requeue)); then
    if ((${SLURM_RESTART_COUNT:-0} < MAX_REQUEUES)); then
        echo "requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "not requeueing: already requeued $MAX_REQUEUES times"
    fi
fi
exit "$rc"
