"""Chat templates of merged models: ``chat_template`` in a recipe.

Values (mergekit's, plus naming a source):

- ``auto``: the template most sources share (mergekit's rule: the most common one among the
  inputs; ties go to the first in recipe order); nothing changes when no source has one;
- ``chatml``: the built-in ChatML template (the one mergekit also ships under that name);
- a Jinja template string (it contains ``{{`` or ``{%``): used as written;
- a source key or model reference: that model's template (evomerge's addition).

The merged directory gets the template as ``chat_template.jinja`` (what ``transformers``
writes and loads); a ``chat_template`` key in the copied ``tokenizer_config.json`` and a
``chat_template.json`` are removed so that only one template is present.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
BUILTIN = {"chatml": CHATML}
JINJA_FILE = "chat_template.jinja"


def is_template_text(value: str) -> bool:
    return "{{" in value or "{%" in value


def read_chat_template(model_dir: str | Path) -> str | None:
    """The default chat template of an HF directory (chat_template.jinja, else the
    tokenizer_config.json key; a list of named templates gives its ``default`` one)."""
    d = Path(model_dir)
    if (d / JINJA_FILE).is_file():
        return (d / JINJA_FILE).read_text(encoding="utf-8")
    for name, key in (("tokenizer_config.json", "chat_template"), ("chat_template.json", "chat_template")):
        p = d / name
        if not p.is_file():
            continue
        try:
            value = json.loads(p.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {p}: {e}") from None
        if isinstance(value, list):  # [{name, template}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default") or next(iter(named.values()), None)
        if isinstance(value, str) and value:
            return value
    return None


def resolve_chat_template(spec: Any, sources: Mapping[str, str], order: list[str] | None = None) -> str | None:
    """Template text for a normalized ``chat_template`` value (see the module docstring)."""
    if spec is None:
        return None
    if spec == "auto":
        keys = order or list(sources)
        found = [t for t in (_template_of(sources[k], k) for k in keys) if t]
        if not found:
            return None
        counts = Counter(found)
        best = max(counts.values())
        return next(t for t in found if counts[t] == best)
    if isinstance(spec, str) and spec in BUILTIN:
        return BUILTIN[spec]
    if isinstance(spec, Mapping) and "template" in spec:
        return str(spec["template"])
    if isinstance(spec, Mapping) and "source" in spec:
        key = spec["source"]
        text = _template_of(sources[key], key)
        if text is None:
            raise CheckpointError(f"chat_template: model {key!r} ({sources[key]}) has no chat template")
        return text
    raise CheckpointError(f"chat_template: cannot use {spec!r}")


def _template_of(path: str, key: str) -> str | None:
    from .opener import open_checkpoint

    tok_dir = open_checkpoint(path).tokenizer_dir  # a LoRA adapter: its base's tokenizer
    return read_chat_template(tok_dir) if tok_dir is not None else None


def apply_chat_template(out_dir: Path, template: str) -> None:
    """Make ``template`` the only chat template of the tokenizer files in ``out_dir``."""
    (out_dir / JINJA_FILE).write_text(template, encoding="utf-8")
    (out_dir / "chat_template.json").unlink(missing_ok=True)
    cfg = out_dir / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if "chat_template" in data:
            del data["chat_template"]
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
