#!/bin/bash
# The same run on 2 nodes x 4 GPUs with torchrun, on clusters without SLURM: run this on every node with its
# NODE_RANK (0 on the main node) and the main node's address:
#   MAIN_ADDR=10.0.0.1 NODE_RANK=0 bash examples/slurm/distill_torchrun.sh [overrides...]
# torchrun sets the ranks; Lightning's TorchElasticEnvironment reads them. The run directory must be on a
# file system that every node sees (rank 0 writes results and the report; every rank reads the checkpoints).
set -euo pipefail
torchrun --nnodes 2 --nproc-per-node 4 --node-rank "${NODE_RANK:?}" \
    --master-addr "${MAIN_ADDR:?}" --master-port "${MAIN_PORT:-29500}" \
    "$(command -v lightning-kd)" trainer=ddp trainer.devices=4 trainer.num_nodes=2 \
    "hydra.run.dir=${RUN_DIR:-outputs/two_nodes}" "$@"
