#!/usr/bin/env bash
# Run on every node: data parallel x pipeline parallel training over several nodes with torchrun.
#   HOST0=10.0.0.1 NNODES=2 GPUS=8 DP=4 bash examples/launch_multinode.sh [more pipetrain train flags]
# HOST0 is an address of the first node that every node can reach (torchrun's rendezvous store listens
# there on PORT). The pipeline is WORLD / DP ranks long (NNODES * GPUS / DP); keep it within one node so
# activations use NVLink and only the gradient all-reduce crosses nodes.
set -euo pipefail
: "${HOST0:?set HOST0 to an address of the first node}"
NNODES=${NNODES:-2} GPUS=${GPUS:-8} DP=${DP:-$NNODES} PORT=${PORT:-29400} JOB=${JOB:-pipetrain}
RESTARTS=${RESTARTS:-3} CKPT=${CKPT:-runs/$JOB}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0   # the network interface between nodes, if several
# torchrun >= 2.5 keeps its store across restarts; without this a restarted rank can read a dead rank's address
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS" --rdzv-backend c10d --rdzv-endpoint "$HOST0:$PORT" \
    --rdzv-id "$JOB" --max-restarts "$RESTARTS" \
    -m pipetrain train --dp "$DP" --checkpoint-dir "$CKPT" --checkpoint-every 100 --resume "$@"
