"""evomerge: evolve model merges.

The spine, one candidate at a time::

    config (YAML, pydantic)  -> evomerge/config.py
    genome (numpy vector)    -> evomerge/spaces/      decode(genome) -> recipe -> MergePlan
    MergePlan                -> evomerge/plan.py      per output tensor: inputs, operator, params
    materializer (torch)     -> evomerge/materialize.py + evomerge/ops/
    model                    -> evomerge/checkpoint/  HF checkpoints in and out
    fitness backend          -> evomerge/fitness/     per-example scores
    optimizer.tell           -> evomerge/optim/
    the loop                 -> evomerge/engine/
"""

__version__ = "0.1.0"
