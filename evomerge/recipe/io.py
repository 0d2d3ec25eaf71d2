"""Recipe files in, plans out: :func:`load_recipe` and :func:`compile_recipe`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..plan import MergePlan
from .built import normalize_built
from .compile import compile_normalized
from .normalize import normalize_recipe


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping in a recipe YAML file (evomerge or mergekit); ConfigError names the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "not found"
        raise ConfigError(f"recipe file {str(p)!r} {what}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe file {str(p)!r}: {e}") from None
    return parse_recipe_text(text, str(p))


def parse_recipe_text(text: str, where: str = "recipe") -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}:{at} invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a YAML mapping (merge_method, models...), got {type(data).__name__}")
    return data


def load_recipe(recipe: str | os.PathLike | dict[str, Any], base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Normalized recipe from a file (evomerge or mergekit YAML), YAML text, or a dict.

    Relative model paths in a file resolve against the file's directory; in a dict or
    text, against ``base_dir`` (default: the current directory).
    """
    if isinstance(recipe, dict):
        return normalize_recipe(recipe, base_dir)
    if isinstance(recipe, os.PathLike):
        p = Path(recipe)
        return normalize_recipe(read_recipe_file(p), base_dir if base_dir is not None else p.expanduser().absolute().parent)
    if isinstance(recipe, str):
        if "\n" in recipe or (":" in recipe and not Path(recipe).expanduser().exists()):
            return normalize_recipe(parse_recipe_text(recipe), base_dir)
        p = Path(recipe)
        return normalize_recipe(read_recipe_file(p), base_dir if base_dir is not None else p.expanduser().absolute().parent)
    raise ConfigError(f"recipe: expected a file path, YAML text or a mapping, got {type(recipe).__name__}")


def compile_recipe(recipe: str | os.PathLike | dict[str, Any], *, base_dir: str | os.PathLike | None = None) -> MergePlan:
    """Compile a recipe (file, YAML text or dict; evomerge or mergekit format) to a MergePlan.

    Errors a user can make raise ConfigError naming the field path, e.g.
    ``models[1].parameters.density: 3 values for 2 layers ...`` or
    ``merge_method: unknown operator 'tiez' (did you mean 'ties'?)``; sources that cannot be
    merged raise IncompatibleModelsError naming the model and tensor. ``plan.meta`` holds
    ``{"recipe": <normalized recipe>, "method": <merge_method>}``.
    """
    return compile_normalized(load_recipe(recipe, base_dir))


def compile_built(recipe: dict[str, Any]) -> MergePlan:
    """Compile a recipe evomerge's own code just built (a search space's decoded genome).

    The same plan, hash and ``plan.meta`` as :func:`compile_recipe` gives for it, without
    normalizing it again as user YAML (:func:`~evomerge.recipe.built.normalize_built`; a
    recipe of another shape is normalized as usual).

    Args:
        recipe: the recipe dict, as the code built it (not read from a file or a log).

    Raises:
        ConfigError: a recipe of another shape that :func:`normalize_recipe` refuses, or a
            parameter the compiler refuses.
    """
    return compile_normalized(normalize_built(recipe))


def dump_recipe(recipe: dict[str, Any]) -> str:
    """YAML text of a (normalized) recipe, numbers lists kept on one line."""
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
