"""The command line that runs a plan with `pipetrain train`, and what of the plan it cannot run yet."""

from __future__ import annotations

from ..models import PRESETS
from .plan import Plan
from .specs import ClusterSpec, ModelSpec

# planner presets that `pipetrain train --hf` does not run yet (models.hf_layout.NOT_YET has the full list)
NOT_FROM_HF = {"deepseek-v3": "from_hf does not run DeepseekV3ForCausalLM yet (multi-head latent attention and "
                              "grouped routing: not checked against HF's forward)",
               "grok-moe": "no transformers class: its layers would be written for pipetrain (see 'any model')"}
GPUS_PER_NODE = 8  # torchrun's processes per node where the cluster does not say (an HGX node)


def train_command(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> tuple[str, list[str]]:
    """(the torchrun command line, the notes that go with it): a plan's layout, schedule, batch, precision and
    shard mode as `pipetrain train` flags. A note says what the runtime cannot run as planned."""
    devices = plan.devices
    notes = []
    if cluster.name == "local":
        launch = f"torchrun --standalone --nproc-per-node {devices}"
    else:
        per_node = min(devices, GPUS_PER_NODE, cluster.domain)
        launch = (f"torchrun --nnodes {devices // per_node} --nproc-per-node {per_node} "
                  "--rdzv-backend c10d --rdzv-endpoint HOST:29500")
        notes.append("HOST: the first node's address; run the command on every node")
    if model.name in PRESETS:  # (a model the trainer builds by name)
        what = f"--preset {model.name}"
    else:
        what = f"--hf PATH/TO/{model.name}"
        notes.append(f"PATH/TO/{model.name}: a Hugging Face folder of the model (config.json and weights)")
    batch = plan.microbatch_size * plan.microbatches * plan.dp
    flags = [what, f"--seq-len {model.seq}", f"--dp {plan.dp}", f"--schedule {plan.schedule}",
             f"--microbatches {plan.microbatches}", f"--batch-size {batch}", f"--precision {cluster.dtype}"]
    if plan.stages_per_rank > 1:
        flags.append(f"--stages-per-rank {plan.stages_per_rank}")
    if plan.shard != "none":
        flags.append(f"--shard {plan.shard}")
    if plan.ep > 1:
        flags.append(f"--ep {plan.ep}")
    if plan.vocab_parallel:
        flags.append("--vocab-parallel")
    if model.name in NOT_FROM_HF:
        notes.append(f"{model.name}: {NOT_FROM_HF[model.name]}")
    if plan.recompute:
        flags.append("--activation-checkpointing")
    if plan.tp > 1:
        flags.append(f"--tp {plan.tp}")
        # the plan assumes Megatron's sequence parallelism (the reference models have it), except with
        # vocabulary parallelism, which runs without it (and the plan's memory says so)
        if plan.vocab_parallel:
            pass
        elif model.name in PRESETS and model.seq % plan.tp == 0:
            flags.append("--sequence-parallel")
        else:
            # Korthikanti et al., per token and hidden unit with flash attention: 10 + 24 / tp bytes kept per block
            # without sequence parallelism, 34 / tp with it; recomputation keeps each block's input, 2 / tp with it
            more = plan.tp if plan.recompute else (10 + 24 / plan.tp) / (34 / plan.tp)
            why = "from_hf layers split" if model.name not in PRESETS else \
                f"seq {model.seq} is not a multiple of it, so the layers split"
            notes.append(f"tp {plan.tp}: {why} without sequence parallelism (activations between blocks stay "
                         f"whole), which holds {more:.1f}x the activation memory this plan assumes")
    return f"{launch} -m pipetrain train {' '.join(flags)}", notes
