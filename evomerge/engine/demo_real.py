"""`evomerge demo --real`: evolve a merge of real LLM experts and report it honestly.

1. build (or reuse) SmolLM2-135M-Instruct and one full-checkpoint skill expert per
   :data:`~evomerge.zoo.smollm2_experts.DEMO_SKILLS` (LoRA-trained, folded into the base,
   cached by config hash: :mod:`evomerge.zoo.smollm2_experts`);
2. write the run's tasks (one per skill; ``search`` / ``validation`` / ``heldout`` files,
   disjoint and never trained on) with the chosen search ``objective``:
   ``exact_match`` (greedy answers), ``loglik`` (the gold answer's probability,
   teacher-forced: one forward pass, far less noisy) or ``mix`` (half each);
3. run a per-layer task-arithmetic search (CMA-ES) through the ordinary run machinery:
   baselines first (each expert, uniform task arithmetic, TIES at density 0.5), the final
   chosen on the validation split (engine/selection.py), and the final and the baselines
   scored on held-out data;
4. the table: held-out exact match (%, ± standard error) of each expert, uniform task
   arithmetic, TIES and the evolved final, per skill and combined, and the evolved final's
   margin over the best untuned merge with the paired standard error of the difference.

Whatever the search objective, the table is exact match on held-out items (report tasks
``em_<skill>``); nothing is tuned or selected on them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

OBJECTIVES: dict[str, dict[str, Any]] = {
    "exact_match": {"scoring": "exact_match"},
    # the geometric-mean probability of the answer's tokens and the end-of-turn token
    # (exp of the mean log-prob per token). Measured here: the whole answer's probability
    # (norm "answer") is ~0 on every skill a merge has not fully kept, so it gave the search
    # no signal there; per token it does.
    "loglik": {"scoring": "loglik", "loglik_norm": "token", "loglik_suffix": "<|im_end|>"},
    "mix": {"scoring": "exact_match", "loglik_mix": 0.5, "loglik_norm": "token",
            "loglik_suffix": "<|im_end|>"},
}


@dataclass
class RealDemoSettings:
    """Everything that defines one real demo run (tests shrink it)."""

    skills: tuple[str, ...] = ("reverse", "upper", "maxdigit")
    objective: str = "loglik"
    search_items: int = 30  # per skill
    validation_items: int = 40  # per skill
    heldout_items: int = 100  # per skill
    budget: int = 60
    popsize: int | None = 8  # None: pycma's default from the dimension (10 for n = 9)
    top_k: int = 3  # candidates re-scored on validation (with the baselines and the CMA mean)
    # 3 layer groups x 3 experts = 9 weights (LoRA never touched embeddings or norms: those
    # stay at the initial weight)
    layer_groups: int = 3
    split_attn_mlp: bool = False
    weight_high: float = 2.0
    seed: int = 0
    batch_size: int = 64
    num_threads: int | None = None  # default: OMP_NUM_THREADS, else 2
    expert_max_steps: int | None = None  # cap the experts' training (tests)
    extra: dict[str, Any] = field(default_factory=dict)  # further RunConfig fields

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"demo --real: unknown objective {self.objective!r}; "
                              f"use one of {', '.join(OBJECTIVES)}")
        if len(self.skills) < 2:
            raise ConfigError("demo --real: needs at least two skills")


def task_dir(root: Path, s: RealDemoSettings, recipe: Any) -> Path:
    key = json.dumps([list(s.skills), s.objective, s.search_items, s.validation_items,
                      s.heldout_items, recipe.to_dict(), OBJECTIVES[s.objective]], sort_keys=True)
    return root / f"tasks-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def write_tasks(out: Path, s: RealDemoSettings, recipe: Any) -> tuple[list[Path], list[Path]]:
    """Search tasks ``smol_<skill>`` (the objective) and report tasks ``em_<skill>`` (exact
    match, held-out only); JSONL files truncated to the settings' sizes."""
    import yaml

    from ..zoo.smollm2_experts import SKILL_BY_NAME, SPLIT_SIZES, make_demo_items

    sizes = {"search": s.search_items, "validation": s.validation_items, "heldout": s.heldout_items}
    for split, n in sizes.items():
        if not 1 <= n <= SPLIT_SIZES[split]:
            raise ConfigError(f"demo --real: {split} items per skill must be in 1..{SPLIT_SIZES[split]}, got {n}")
    items = make_demo_items(tuple(s.skills), recipe)
    out.mkdir(parents=True, exist_ok=True)
    search, report = [], []
    for skill in s.skills:
        files = {}
        for split, n in sizes.items():
            recs = items.tasks[skill][split][:n]
            files[split] = f"{skill}.{split}.jsonl"
            _write(out / files[split], "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
        common = {"prompt": "{input}", "target_field": "target",
                  "max_new_tokens": SKILL_BY_NAME[skill].max_new_tokens, "stop": ["\n"]}
        spec = {"name": f"smol_{skill}", "description": SKILL_BY_NAME[skill].description,
                "data": files["search"], "validation_data": files["validation"],
                "heldout_data": files["heldout"], **common, **OBJECTIVES[s.objective]}
        rep = {"name": f"em_{skill}", "description": f"held-out exact match: {skill}",
               # a report task is scored on its held-out split only; its `data` must not be
               # the search file (the report-split guard refuses that)
               "data": files["heldout"], "heldout_data": files["heldout"], **common,
               "scoring": "exact_match"}
        for d, lst in ((spec, search), (rep, report)):
            p = out / f"{d['name']}.yaml"
            _write(p, yaml.safe_dump(d, sort_keys=False))
            lst.append(p)
    return search, report


def _write(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def real_config(s: RealDemoSettings, experts: dict[str, Path], tasks: list[Path],
                report: list[Path], name: str) -> dict[str, Any]:
    threads = s.num_threads or int(os.environ.get("OMP_NUM_THREADS") or 2)
    cfg: dict[str, Any] = {
        "name": name,
        "models": {k: str(v) for k, v in experts.items()},
        "base_model": "base",
        "space": {"type": "parameter", "method": "task_arithmetic", "layer_groups": s.layer_groups,
                  "split_attn_mlp": s.split_attn_mlp, "non_layer": "uniform",
                  "params": {"weight": {"low": 0.0, "high": s.weight_high, "init": 1.0}}},
        "optimizer": {"name": "cma", "seed": s.seed, **({"popsize": s.popsize} if s.popsize else {})},
        "budget": s.budget,
        "tasks": [{"path": str(p), "weight": 1.0} for p in tasks],
        "report_tasks": [{"path": str(p)} for p in report],
        "backend": {"name": "hf", "batch_size": s.batch_size, "dtype": "float32"},
        "executor": {"name": "local", "num_threads": threads},
        "dtype": "float32",
        "seed": s.seed,
        "selection": {"top_k": s.top_k},
    }
    cfg.update(s.extra)
    return cfg


def run_real_demo(s: RealDemoSettings | None = None, runs_dir: str | Path = "runs",
                  name: str | None = None, root: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Build the experts (cached), run the search, select on validation, build the table."""
    from ..config import parse_config
    from ..zoo.build import default_root
    from ..zoo.smollm2_experts import EXPERTS_DIR, ExpertRecipe, build_smollm2_experts
    from .runner import run_search
    from .selection import load_final
    from .store import RunStore

    s = s or RealDemoSettings()
    s.check()
    recipe = ExpertRecipe(max_steps=s.expert_max_steps)
    zroot = Path(root).expanduser() if root is not None else default_root()
    t0 = time.perf_counter()
    experts = _build_experts(build_smollm2_experts, zroot, s, recipe, progress)
    build_s = time.perf_counter() - t0
    tasks, report = write_tasks(task_dir(zroot / EXPERTS_DIR, s, recipe), s, recipe)
    name = name or f"real-demo-{s.objective}"
    cfg = parse_config(real_config(s, experts, tasks, report, name), source="demo --real")
    run_dir = Path(runs_dir) / name
    t1 = time.perf_counter()
    run_search(cfg, run_dir, progress=progress)
    search_s = time.perf_counter() - t1
    final = load_final(run_dir)
    if final is None:
        raise ConfigError(f"demo --real: run {run_dir} ended without a final model (budget not reached?)")
    table = heldout_table(run_dir, final, [f"em_{k}" for k in s.skills])
    from .export import export_final

    exported = export_final(run_dir, run_dir / "export", overwrite=True)  # a rerun refreshes it
    result = {"run_dir": str(run_dir), "export": str(exported), "selection_rows": final["rows"], "settings": asdict(s), "experts": {k: str(v) for k, v in experts.items()},
              "rows": table["rows"], "margin": table["margin"], "chosen_by": final["chosen_by"],
              "final": final["final"]["label"],
              "seconds": {"experts": build_s, "search_and_selection": search_s,
                          "total": time.perf_counter() - t0}}
    RunStore(run_dir).write_json("demo_real_table.json", result)
    return result


def real_setup(seed: int, budget: int | None = None, objective: str = "exact_match",
               settings: RealDemoSettings | None = None, root: str | Path | None = None) -> Any:
    """The real demo's RunConfig for one seed (experts built or reused, tasks written): the
    ``--real`` setup of benchmarks/search_generalization.py."""
    from ..config import parse_config
    from ..zoo.build import default_root
    from ..zoo.smollm2_experts import EXPERTS_DIR, ExpertRecipe, build_smollm2_experts

    s = RealDemoSettings(**{**asdict(settings or RealDemoSettings()), "seed": seed,
                            "objective": objective})
    if budget:
        s.budget = budget
    s.check()
    recipe = ExpertRecipe(max_steps=s.expert_max_steps)
    zroot = Path(root).expanduser() if root is not None else default_root()
    experts = build_smollm2_experts(zroot, tuple(s.skills), recipe=recipe)
    tasks, report = write_tasks(task_dir(zroot / EXPERTS_DIR, s, recipe), s, recipe)
    return parse_config(real_config(s, experts, tasks, report, f"gen-real-s{seed}"), source="real setup")


def with_objective(cfg: Any, objective: str) -> Any:
    """``cfg`` with every search task rewritten for ``objective`` (:data:`OBJECTIVES`): same
    name and data files, another scorer. The variants are written (once, by content hash)
    under ``<zoo root>/objectives/``; report tasks are left as they are."""
    import yaml

    from ..zoo.build import default_root

    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    refs = []
    for ref in cfg.tasks:
        src = Path(ref.path)
        raw = yaml.safe_load(src.read_text(encoding="utf-8"))
        for key in ("data", "heldout_data", "validation_data", "few_shot_data"):
            if raw.get(key):
                raw[key] = str((src.parent / raw[key]).resolve())
        for key in ("loglik_mix", "loglik_norm", "loglik_transform", "loglik_suffix"):
            raw.pop(key, None)
        raw.update(OBJECTIVES[objective])
        if "loglik_suffix" in raw:  # the end-of-answer token of this run's tokenizer
            eos = _eos_text(cfg)
            if eos:
                raw["loglik_suffix"] = eos
            else:
                raw.pop("loglik_suffix")
        text = yaml.safe_dump(raw, sort_keys=True)
        out = default_root() / "objectives" / hashlib.sha256(text.encode()).hexdigest()[:12]
        out.mkdir(parents=True, exist_ok=True)
        _write(out / src.name, text)
        refs.append(ref.model_copy(update={"path": str(out / src.name)}))
    return cfg.model_copy(update={"tasks": refs})


def _eos_text(cfg: Any) -> str | None:
    from .models import resolve_model

    ref = cfg.models[cfg.base_model or next(iter(cfg.models))]
    path = Path(resolve_model(ref)) / "tokenizer_config.json"
    if not path.is_file():
        return None
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def _build_experts(build, zroot: Path, s: RealDemoSettings, recipe: Any, progress: bool) -> dict[str, Path]:
    from ..zoo.smollm2_experts import expert_steps_cap, missing_experts

    missing = missing_experts(zroot, tuple(s.skills), recipe)
    if not missing or not progress:
        return build(zroot, tuple(s.skills), recipe=recipe)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cap = expert_steps_cap(tuple(missing), recipe)
    Console(stderr=True).print(
        f"building {len(missing)} SmolLM2 expert(s) ({', '.join(missing)}): at most {cap} LoRA "
        f"steps, early stop at 90% on 50 validation items; ~3-4 s a step on 2 idle cores "
        f"(estimate <= {cap * 3.5 / 60:.0f} min; busy machines are slower). Cached afterwards.")
    with Progress(TextColumn("[bold]experts: {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task("starting", total=cap)

        def cb(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        return build(zroot, tuple(s.skills), progress=cb, recipe=recipe)


def heldout_table(run_dir: str | Path, final: dict[str, Any], em_tasks: list[str]) -> dict[str, Any]:
    """Held-out exact match per skill and combined (± SE) of the experts, the untuned merges
    and the validation-selected final; the final's margin over the best untuned merge with
    the paired SE of the difference (same held-out items)."""
    from ..fitness.stderr import combined_se
    from .selection import RESCORE
    from .store import RunStore

    store = RunStore.open(run_dir)
    per = {r["plan_hash"]: r["per_example"] for r in store.read_jsonl(RESCORE)
           if r["split"] == "heldout" and r.get("per_example")}
    weights = {t: 1.0 for t in em_tasks}
    rows = []
    for r in final["rows"]:
        kind = "final" if r.get("final") else r["role"]
        if kind not in ("final", "baseline") or r["label"] == "initial point":
            continue
        scores = per.get(r["plan_hash"])
        if scores is None or not all(t in scores for t in em_tasks):
            rows.append({"model": r["label"], "kind": kind, "error": "no held-out scores"})
            continue
        c = combined_se({t: scores[t] for t in em_tasks}, weights)
        rows.append({"model": r["label"] + ("  [evolved, validation-selected]" if kind == "final" else ""),
                     "kind": kind, "plan_hash": r["plan_hash"], "combined": c["fitness"], "se": c["se"],
                     "tasks": {t: {"mean": v["mean"], "se": v["se"]} for t, v in c["tasks"].items()},
                     "n": c["n"]})
    fin = next((x for x in rows if x["kind"] == "final" and "combined" in x), None)
    untuned = [x for x in rows if x["kind"] == "baseline" and "combined" in x
               and not x["model"].startswith("expert ")]
    margin = None
    if fin is not None and untuned:
        best = max(untuned, key=lambda x: x["combined"])
        diff = _paired_diff(per[fin["plan_hash"]], per[best["plan_hash"]], em_tasks)
        margin = {"vs": best["model"], "points": 100 * diff[0], "se": 100 * diff[1],
                  "outside_one_se": bool(diff[0] - diff[1] > 0)}
    return {"rows": rows, "margin": margin}


def _paired_diff(a: dict[str, list[float]], b: dict[str, list[float]], tasks: list[str]) -> tuple[float, float]:
    """Mean over tasks of the per-task mean difference, and its paired standard error."""
    means, var = [], 0.0
    for t in tasks:
        d = np.asarray(a[t], dtype=float) - np.asarray(b[t], dtype=float)
        means.append(float(d.mean()))
        var += float(d.var(ddof=1)) / d.size if d.size > 1 else 0.0
    k = len(tasks)
    return float(np.mean(means)), math.sqrt(var) / k


def format_real_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    rows = [r for r in result["rows"] if "combined" in r]
    tasks = list(rows[0]["tasks"]) if rows else []
    t = Table(title="held-out exact match (%, ± standard error), items the search and the "
              "selection never scored")
    t.add_column("model")
    for n in tasks:
        t.add_column(n.removeprefix("em_"), justify="right")
    t.add_column("combined", justify="right", style="bold")
    for r in result["rows"]:
        if "combined" not in r:
            t.add_row(r["model"], *(["-"] * (len(tasks) + 1)))
            continue
        t.add_row(r["model"], *(f"{100 * r['tasks'][n]['mean']:.1f} ± {100 * r['tasks'][n]['se']:.1f}"
                                for n in tasks), f"{100 * r['combined']:.1f} ± {100 * r['se']:.1f}")
    return t


def margin_line(result: dict[str, Any]) -> str:
    m = result.get("margin")
    if not m:
        return "no margin: the final or the untuned merges have no held-out score"
    verdict = "outside one SE" if m["outside_one_se"] else "within one SE (not a demonstrated gain)"
    return (f"evolved (validation-selected) vs best untuned merge ({m['vs']}): "
            f"{m['points']:+.1f} ± {m['se']:.1f} points held-out exact match (paired SE), {verdict}")
