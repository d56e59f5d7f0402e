"""The planner: map a model onto a cluster (`pipetrain plan`). No torch needed, except to measure the
local machine (`--cluster local`).

`specs` describes models and clusters (presets, or TOML through `load`), `plan` searches layouts and
schedules (the registry's) by simulation, `calibrate` measures this machine. It may import `schedule`,
`pipetrain.flops` and (to calibrate) `models`, never `train`, `pipeline` or the command line.
"""

from .load import cluster_from, model_from
from .plan import Plan, plan
from .specs import CLUSTERS, MODELS, ClusterSpec, ModelSpec, SpecError

__all__ = ["CLUSTERS", "MODELS", "ClusterSpec", "ModelSpec", "Plan", "SpecError", "cluster_from",
           "model_from", "plan"]
