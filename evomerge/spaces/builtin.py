"""Imports the built-in search spaces so they register."""

from . import (  # noqa: F401
    dfs,  # noqa: F401  (data-flow: layer paths through several models)
    layer_swap,
    lora_pool,  # noqa: F401,E402  (black-box: a provider's LoRA pool)
    m2n2,
    output_mixture,  # noqa: F401,E402  (black-box: mixture of API-only models' outputs)
    parameter,
)
