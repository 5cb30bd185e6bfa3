#!/usr/bin/env bash
# The one launcher of the full-size recipes (scaling/full/*.toml; see scaling/README.md).
#
#   scaling/launch.sh prepare RECIPE   one process: the streamed transformation the run starts
#                                      from (scale-up / scale-out); run it once, on one node
#   scaling/launch.sh train RECIPE     torchrun on this node; run it on every node
#   scaling/launch.sh dry-run RECIPE   here, on CPU: one step rehearsed at full size (its memory)
#
# Multi-node: torchrun's own flags, from the environment (defaults in brackets):
#   NNODES          --nnodes           nodes in the job [the recipe's gpus / gpus_per_node]
#   NPROC_PER_NODE  --nproc-per-node   GPUs per node [the recipe's gpus_per_node]
#   NODE_RANK       --node-rank        this node's index, 0 .. NNODES-1 [0]
#   RDZV_ENDPOINT   --rdzv-endpoint    host:port of the rendezvous, on node 0 [localhost:29500]
#   RUN_ID          --rdzv-id          the same on every node of one job [the recipe's name]
#   MAX_RESTARTS    --max-restarts     a failed rank restarts the job from its last checkpoint [3]
# e.g. on each of 128 nodes: NODE_RANK=$i RDZV_ENDPOINT=node0:29500 scaling/launch.sh train \
#        scaling/full/aquilamoe-8x16b.toml       (under SLURM: sbatch scaling/slurm.sh RECIPE)
set -euo pipefail
usage="usage: scaling/launch.sh prepare|train|dry-run RECIPE"
step=${1:?$usage}
recipe=${2:?$usage}
py=${PYTHON:-python}

case "$step" in
  dry-run)
    exec "$py" -m minimoe dry-run "$recipe" ;;
  prepare)
    args=$("$py" -m minimoe launch-args "$recipe" prepare)
    if [ -z "$args" ]; then
      echo "$recipe: a pretraining run, nothing to prepare (its data: minimoe tokenize)"
      exit 0
    fi
    eval "set -- $args"
    exec "$py" -m minimoe "$@" ;;
  train)
    # torchtitan's settings (run_train.sh, multinode_trainer.slurm): the CUDA caching
    # allocator's expandable segments (less fragmentation at the peak), NCCL warnings, and
    # Python tracebacks when the NCCL watchdog aborts a hung rank
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN} PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}
    read -r per_node nodes name < <("$py" -m minimoe launch-args "$recipe" node)
    args=$("$py" -m minimoe launch-args "$recipe" train)
    eval "set -- $args"
    exec "$py" -m torch.distributed.run \
      --nnodes "${NNODES:-$nodes}" --nproc-per-node "${NPROC_PER_NODE:-$per_node}" \
      --node-rank "${NODE_RANK:-0}" --rdzv-backend c10d \
      --rdzv-endpoint "${RDZV_ENDPOINT:-localhost:29500}" --rdzv-id "${RUN_ID:-$name}" \
      --max-restarts "${MAX_RESTARTS:-3}" -m minimoe "$@" ;;
  *)
    echo "$usage" >&2
    exit 2 ;;
esac
