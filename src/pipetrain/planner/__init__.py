"""The planner: map a model onto a cluster (`pipetrain plan`). No torch needed, except to measure the
local machine (`--cluster local`)."""

from .load import cluster_from, model_from
from .plan import Plan, plan
from .specs import CLUSTERS, MODELS, ClusterSpec, ModelSpec, SpecError

__all__ = ["CLUSTERS", "MODELS", "ClusterSpec", "ModelSpec", "Plan", "SpecError", "cluster_from",
           "model_from", "plan"]
