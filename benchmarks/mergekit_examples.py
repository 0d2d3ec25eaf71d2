"""mergekit's example configs through evomerge: which merge, which stop with one line.

Takes the YAML files of a mergekit checkout's ``examples/`` folder (not shipped here: pass
``--examples DIR``), plus one config per merge method evomerge added for mergekit parity
(written in mergekit's syntax, below), substitutes tiny local models for the Hub ids
(the ``base_model`` becomes a random tiny Llama, every other model a "fine-tune" of it =
base + noise; 40 layers so every example's ``layer_range`` fits), and runs
``evomerge merge`` with each evomerge tree given by ``--tree NAME=PATH`` (e.g. today's main
and a branch). With ``--mergekit-bin`` it also runs ``mergekit-yaml`` on the same config in
float32 and reports the largest absolute weight difference to the last tree's merge.

    python benchmarks/mergekit_examples.py --examples /path/to/mergekit/examples \\
        --tree main=/work/main --tree branch=. --mergekit-bin /path/to/mergekit-yaml

Prints a markdown table: config -> result per tree ("ok" or the error line).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
LAYERS = 40

# One config per method added for parity, in mergekit's syntax (Hub-like ids are substituted).
METHOD_CONFIGS = {
    "nuslerp": """
merge_method: nuslerp
base_model: org/base
models:
  - {model: org/a, parameters: {weight: 0.6}}
  - {model: org/b, parameters: {weight: [0.2, 0.8]}}
dtype: bfloat16
""",
    "multislerp": """
merge_method: multislerp
base_model: org/base
models:
  - {model: org/a, parameters: {weight: 0.5}}
  - {model: org/b, parameters: {weight: 0.3}}
  - {model: org/c, parameters: {weight: 0.2}}
dtype: bfloat16
""",
    "karcher": """
merge_method: karcher
models: [{model: org/a}, {model: org/b}, {model: org/c}]
parameters: {max_iter: 10, tol: 1.0e-5}
dtype: bfloat16
""",
    "sce": """
merge_method: sce
base_model: org/base
models: [{model: org/a}, {model: org/b}, {model: org/c}]
parameters: {select_topk: 0.3}
dtype: bfloat16
""",
    "nearswap": """
merge_method: nearswap
base_model: org/base
models: [{model: org/a}]
parameters: {t: 0.0001}
dtype: bfloat16
""",
    "ram": """
merge_method: ram
base_model: org/base
models: [{model: org/a}, {model: org/b}]
dtype: bfloat16
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: org/base
models: [{model: org/a}, {model: org/b}]
parameters: {r: 0.1, alpha: 0.2}
dtype: bfloat16
""",
    "task_arithmetic + density (unused)": """
merge_method: task_arithmetic
base_model: org/base
models:
  - {model: org/a, parameters: {weight: 0.5, density: 0.5}}
  - {model: org/b, parameters: {weight: 0.5, density: 0.5}}
dtype: bfloat16
""",
}


def build_models(root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_expert, make_tiny_llama

    out = {"base": root / "base"}
    if not (root / "base" / "config.json").exists():
        make_tiny_llama(root / "base", seed=0, layers=LAYERS)
    for i in (1, 2, 3):
        p = root / f"e{i}"
        if not (p / "config.json").exists():
            make_tiny_expert(root / "base", p, seed=i)
        out[f"e{i}"] = p
    return out


def substitute(cfg: dict, models: dict[str, Path]) -> dict:
    """Hub ids -> local tiny models: base_model -> base, the others in order -> e1, e2, e3."""
    mapping: dict[str, str] = {}
    if cfg.get("base_model"):
        mapping[cfg["base_model"]] = str(models["base"])
    experts = iter(["e1", "e2", "e3"])

    def sub(name: str) -> str:
        if name not in mapping:
            mapping[name] = str(models[next(experts)])
        return mapping[name]

    for m in cfg.get("models") or []:
        m["model"] = sub(m["model"])
    for s in cfg.get("slices") or []:
        for src in s["sources"]:
            src["model"] = sub(src["model"])
    if cfg.get("base_model"):
        cfg["base_model"] = mapping[cfg["base_model"]]
    return cfg


def run_tree(tree: Path, cfg_file: Path, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    code = "import sys; from evomerge.cli import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code, "merge", str(cfg_file), "--out", str(out),
                        "--device", "cpu", "--overwrite"],
                       capture_output=True, text=True, env=env, timeout=1200,
                       cwd=cfg_file.parent)  # not the caller's cwd: '' on sys.path shadows the tree
    if p.returncode == 0:
        warn = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
        return "ok" + (f" ({warn[0]})" if warn else "")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit {p.returncode}")[:160]


def max_diff(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = load(a), load(b)
    if x.keys() != y.keys():
        return f"tensor names differ ({len(x)} vs {len(y)})"
    return f"{max(float((x[k].float() - y[k].float()).abs().max()) for k in x):.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=Path, help="a mergekit checkout's examples/ folder")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="an evomerge source tree to run (repeat); default: this one")
    ap.add_argument("--mergekit-bin", help="mergekit-yaml, to compare weights in float32")
    ap.add_argument("--workdir", type=Path, help="models and outputs (default: a temp dir)")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(REPO)]]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mk_examples_"))
    models = build_models(work / "models")

    configs: list[tuple[str, str]] = []
    if args.examples:
        for f in sorted(args.examples.glob("*.y*ml")):
            configs.append((f"examples/{f.name}", f.read_text()))
    configs += [(f"method: {k}", v) for k, v in METHOD_CONFIGS.items()]

    head = ["config"] + [n for n, _ in trees] + (["mergekit max abs diff (fp32)"] if args.mergekit_bin else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, (name, text) in enumerate(configs):
        cfg = substitute(yaml.safe_load(text), models)
        f = work / f"cfg{i}.yaml"
        f.write_text(yaml.safe_dump(cfg, sort_keys=False))
        row = [name]
        for tname, tpath in trees:
            row.append(run_tree(Path(tpath), f, work / f"out{i}_{tname}"))
        if args.mergekit_bin:
            cfg32 = {**cfg, "dtype": "float32"}
            cfg32.pop("out_dtype", None)
            f32 = work / f"cfg{i}_fp32.yaml"
            f32.write_text(yaml.safe_dump(cfg32, sort_keys=False))
            mk = subprocess.run([args.mergekit_bin, str(f32), str(work / f"mk{i}")],
                                capture_output=True, text=True, timeout=1200)
            if mk.returncode != 0:
                lines = [ln for ln in mk.stderr.splitlines() if ln.strip()]
                row.append("mergekit failed: " + (lines[-1] if lines else "?")[:100])
            else:
                res = run_tree(Path(trees[-1][1]), f32, work / f"ev{i}_fp32")
                row.append(max_diff(work / f"mk{i}", work / f"ev{i}_fp32") if res.startswith("ok") else "-")
        print("| " + " | ".join(re.sub(r"\|", "/", c) for c in row) + " |", flush=True)


if __name__ == "__main__":
    main()
