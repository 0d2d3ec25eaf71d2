"""Imports every built-in operator module so their ``@register_op`` decorators run."""

from __future__ import annotations

from . import (  # noqa: F401
    control,  # noqa: F401,E402  (evo_lora: control step of LoRA-pool runs)
    factor,  # noqa: F401,E402  (topk_sum: LoRA pool merges)
    linear,
    mixture_control,  # noqa: F401,E402  (output_mixture: control step of API-only mixtures)
    model_stock,
    passthrough,
    selective,  # sce, ram, ramplus_tl
    spherical,
    spherical_multi,  # nuslerp, multislerp, karcher
    swap_fusion,  # nearswap, arcee_fusion
    task_vectors,
)
