"""One training run (`job.run`) and its stages: records, the step loop, evaluation during training, the
strategies (one process / replicas / shards), world, optimizer, offload, compilation, throughput, saving,
checkpoints and the run directory.
"""

from __future__ import annotations

from chattune import lazy_exports

# Public entry points, imported on first use: importing one stage never loads another's libraries.
_EXPORTS = {
    "run": "chattune.train.job",
    "TrainingData": "chattune.train.records",
    "Plan": "chattune.train.records",
    "ModelSetup": "chattune.train.records",
    "RunDir": "chattune.train.records",
    "Optim": "chattune.train.records",
    "LoopResult": "chattune.train.records",
    "World": "chattune.train.world",
    "read_world": "chattune.train.world",
    "Strategy": "chattune.train.strategies",
    "build_strategy": "chattune.train.strategies",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
