"""Imports the built-in optimizers so their ``@register_optimizer`` decorators run.

``make_optimizer`` imports this module; nevergrad itself is imported only when an ``ng:``
optimizer is built.
"""

from __future__ import annotations

from . import cmaes, evo_merging, lorahub, m2n2, map_pareto, ng, nsga2, random_search, subspace  # noqa: F401,E501
