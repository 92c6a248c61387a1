#!/usr/bin/env bash
# Multi-node pretraining with torchrun's c10d rendezvous: run the SAME command on every node.
# Node ranks are assigned by the rendezvous; the c10d store runs inside the torchrun agent
# on the host named in SIMCLR_EMBED_RDZV_HOST, which every node must reach on its port.
#
#   SIMCLR_EMBED_RDZV_HOST=10.0.0.11 SIMCLR_EMBED_NNODES=2 \
#     deploy/torchrun-multinode.sh --data /datasets/products --out /data/jobs/products-run1
#
# Arguments are passed to `simclr-embed train` (python -m trainer.cli train) unchanged. Each
# process torchrun starts sees RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and joins torchrun's
# group (env://) instead of spawning its own: one process per GPU, LOCAL_RANK picks the GPU,
# global rank 0 alone writes checkpoints, metrics and the result. --out must be one folder
# shared by all nodes; a group that torchrun restarts resumes from its last checkpoint.
# On CPU-only nodes set SIMCLR_EMBED_NPROC_PER_NODE to a number (gloo processes).
#
# In the worker image this script is /usr/local/bin/simclr-embed-torchrun
# (deploy/compose.worker-node.yml, profile `torchrun`). NCCL picks its network interface
# itself; set NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME) when a node has several.
set -euo pipefail

: "${SIMCLR_EMBED_RDZV_HOST:?set SIMCLR_EMBED_RDZV_HOST to the address of the rendezvous node}"
NNODES="${SIMCLR_EMBED_NNODES:-2}"                  # N, or MIN:MAX for elastic training
NPROC_PER_NODE="${SIMCLR_EMBED_NPROC_PER_NODE:-gpu}" # gpu = one process per visible GPU
RDZV_PORT="${SIMCLR_EMBED_RDZV_PORT:-29400}"
RDZV_ID="${SIMCLR_EMBED_RDZV_ID:-simclr-embed}"      # same id on all nodes, new id per run
MAX_RESTARTS="${SIMCLR_EMBED_MAX_RESTARTS:-3}"       # restarts resume from the last checkpoint

if [ "$#" -eq 0 ]; then
    echo "usage: $0 --data DATASET_DIR --out RUN_DIR [train options...]" >&2
    exit 2
fi

exec torchrun \
    --nnodes "${NNODES}" \
    --nproc-per-node "${NPROC_PER_NODE}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${SIMCLR_EMBED_RDZV_HOST}:${RDZV_PORT}" \
    --rdzv-id "${RDZV_ID}" \
    --max-restarts "${MAX_RESTARTS}" \
    -m trainer.cli train "$@"
