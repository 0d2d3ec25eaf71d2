"""User recipes and mergekit YAML <-> MergePlan.

A recipe is mergekit's YAML, so a mergekit config for a method both tools share is a valid
evomerge recipe (users come from mergekit). ``evomerge merge RECIPE.yaml --out DIR`` is the
counterpart of ``mergekit-yaml``. Example::

    merge_method: ties                # alias: method
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: [0.3, 0.7]}   # gradient across layers
      - model: ./lang
        parameters:
          weight:
            - {filter: attn, value: 0.8}                  # attention tensors
            - {filter: mlp, value: {layers: [1, 1, 0.5, 0.5]}}  # exact value per layer
            - {value: 1.0}                                # everything else
          density: 0.5
    parameters: {normalize: true}     # operator scalars: lambda, normalize, t, epsilon...
    dtype: bfloat16                   # output dtype (out_dtype is read too)
    tokenizer_source: base            # 'base' or a model
    seed: 0                           # alias: random_seed; seeds DARE/DELLA masks

Fields shared with mergekit: ``merge_method``, ``base_model``, ``models: [{model,
parameters}]``, ``slices: [{sources: [{model, layer_range: [a, b], parameters}],
parameters, base_model}]`` (``layer_range`` end-exclusive), ``parameters``, ``dtype`` /
``out_dtype``, ``tokenizer_source``, ``random_seed``. Parameter values are a scalar, a
gradient list (interpolated across the layers of the slice exactly as mergekit does), or a
list of ``{filter: SUBSTRING, value}`` (first match wins; no filter = default); per-model
values override slice values, which override global ones. See :mod:`.params` for the exact
rules and :mod:`.compile` for how each operator uses the base model.

evomerge additions:

- ``sources: {key: path}``: name models by short keys and use the keys everywhere else
  (search spaces write recipes this way). A path given directly gets a key derived from its
  directory name. Relative paths resolve against the recipe file's directory. A model may
  be a PEFT LoRA adapter directory: it reads as base + adapter (its
  ``adapter_config.json`` names the local base), so LoRA experts merge like full ones.
- Filter aliases ``attn`` and ``mlp``: besides the substring, they match the tensors
  :meth:`ModelLayout.kind_of` classifies as attention / MLP, for architectures that name
  them differently; separate values for attention and MLP are two filter entries.
- ``{layers: [v0, v1, ...]}``: one exact value per layer of the slice (the length must equal
  the number of layers). Equivalent to a gradient list of length ``num_layers``; exported
  to mergekit as one.
- Layer assembly: ``slices`` with one source each copy layers (passthrough: output layer i
  from model m, layer j; frankenmerges, layer swaps), renumbered; the output config's
  ``num_hidden_layers`` becomes the assembled count.
- Non-layer tensors (embeddings, final norm, lm_head) of a ``slices`` recipe follow
  mergekit's rule by default: embeddings from the first slice's sources, everything else
  from the last slice's (merged with the slice's parameters at ``t = 0``, as mergekit 0.1
  does). ``non_layer: {model: KEY}`` takes them all from one model;
  ``non_layer: {merge: true}`` merges them over every model of the slices with the recipe's
  method (an average when the method is passthrough), optionally with its own
  ``merge_method`` and ``parameters``.
- LiNeS: ``merge_method: task_arithmetic`` with ``parameters: {lines_alpha: a,
  lines_beta: b}`` scales each layer's task vector by ``a`` at the first layer rising
  linearly to ``b`` at the last (compiled to the ``lines`` operator; ``merge_method: lines``
  with ``alpha``/``beta`` is the same).

Public API: :func:`compile_recipe` (recipe -> MergePlan), :func:`load_recipe` (file ->
normalized recipe), :func:`normalize_recipe`, :func:`recipe_to_mergekit` /
:func:`plan_to_mergekit` / :func:`recipe_to_mergekit_yaml` (back to mergekit where
expressible).
"""

from __future__ import annotations

from .built import built_form, normalize_built
from .compile import clear_compile_cache, compile_normalized
from .io import (
    compile_built,
    compile_recipe,
    dump_recipe,
    load_recipe,
    parse_recipe_text,
    read_recipe_file,
)
from .mergekit import plan_to_mergekit, recipe_to_mergekit, recipe_to_mergekit_yaml
from .normalize import normalize_recipe

__all__ = [
    "built_form",
    "clear_compile_cache",
    "compile_built",
    "compile_normalized",
    "compile_recipe",
    "dump_recipe",
    "load_recipe",
    "normalize_built",
    "normalize_recipe",
    "parse_recipe_text",
    "plan_to_mergekit",
    "read_recipe_file",
    "recipe_to_mergekit",
    "recipe_to_mergekit_yaml",
]
