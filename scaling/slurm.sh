#!/usr/bin/env bash
# A SLURM job for a full-size recipe: one task per node, each running `scaling/launch.sh train`
# (torchrun on that node's GPUs); the rendezvous is on the job's first node.
#
#   sbatch --nodes=128 scaling/slurm.sh scaling/full/aquilamoe-8x16b.toml
#
# The network settings follow torchtitan's multinode_trainer.slurm; set them for your cluster
# (on AWS EFA also FI_PROVIDER=efa, on InfiniBand NCCL_IB_HCA). scaling/launch.sh sets the
# allocator (expandable segments) and the NCCL and Python diagnostics.
#SBATCH --job-name=minimoe
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
set -euo pipefail
recipe=${1:?usage: sbatch --nodes=N scaling/slurm.sh RECIPE}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export NNODES=$SLURM_JOB_NUM_NODES RDZV_ENDPOINT="$head:29500" RUN_ID="minimoe-$SLURM_JOB_ID"
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0,en,eth,em,bond}
export NCCL_BUFFSIZE=${NCCL_BUFFSIZE:-2097152}
# SLURM_NODEID is set per task, so each node reads its own
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec scaling/launch.sh train "$1"' \
  slurm-task "$recipe"
