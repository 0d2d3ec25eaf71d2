"""`evomerge report RUN`: one self-contained HTML page per run, for every space type, for runs
with failed and racing-cut candidates, for >2 objectives; bad input is one line, exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_runs import make_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["summary", "curves", "front", "recipe", "spread", "meta"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", "report", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _check_page(html: str) -> None:
    for s in SECTIONS:
        assert f'<section id="{s}">' in html, s
    assert "<script" not in html  # no JS at all (the failed baseline's error text is escaped)
    assert "&lt;script&gt;" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)
    assert html.count("<svg") >= 4


@pytest.mark.parametrize("space", ["parameter", "layer_swap", "dfs", "m2n2", "lora_pool", "blackbox",
                                   "output_mixture", "something_new"])
def test_every_space_type_renders(tmp_path: Path, space: str) -> None:
    from evomerge.report.html import write_report

    run = make_run(tmp_path / space, space, n=30)
    html = write_report(run).read_text()
    _check_page(html)
    recipe = html.split('<section id="recipe">')[1].split("</section>")[0]
    assert "<svg" in recipe and "<table" in recipe  # a heat map and the field table
    if space == "parameter":  # filtered values: one row per model and tensor filter
        assert "math · attn" in recipe and "chat · rest" in recipe
    if space in ("layer_swap", "dfs"):
        assert "source model of each output layer" in recipe


def test_cli_failed_and_cut_candidates(tmp_path: Path) -> None:
    run = make_run(tmp_path / "faulty", n=60, failed_every=4, cut_every=5)
    out = tmp_path / "sub.html"
    r = _cli(str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    html = out.read_text()
    _check_page(html)
    # baselines table: best + 2 baselines with a standard error, the failed one without
    table = html.split('<table class="baselines">')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>", table)
    labels = {lab: (fit, se) for lab, fit, se in rows}
    assert float(labels["baseline: base"][1]) > 0 and float(labels["baseline: math"][1]) > 0
    assert labels["baseline: broken"] == ("–", "–")
    assert "failed / racing-cut / cached</td><td style='text-align:left'>15 / 9 / 0" in html
    # the front never holds a failed or cut candidate (ids 3,7,.. failed; 4,9,.. cut)
    front = html.split('<table class="front">')[1].split("</table>")[0]
    ids = [int(x) for x in re.findall(r"<tr><td>(\d+)</td>", front)]
    assert ids and all(i % 4 != 3 and i % 5 != 4 for i in ids)
    assert 'class="front"' in html.split('<section id="front">')[1]


def test_three_objectives_use_parallel_coordinates(tmp_path: Path) -> None:
    from evomerge.report.html import write_report

    html = write_report(make_run(tmp_path / "m3", n=40, tasks=3)).read_text()
    front = html.split('<section id="front">')[1].split("</section>")[0]
    assert "parallel coordinates" in front and front.count("<svg") == 1 + 3  # + 3 pairwise plots


def test_declared_objectives_and_empty_run(tmp_path: Path) -> None:
    from evomerge.report.html import write_report

    objs = [{"name": "both", "tasks": ["task_a", "task_b"]}, {"name": "c", "tasks": ["task_c"]}]
    html = write_report(make_run(tmp_path / "o", n=20, tasks=3, objectives=objs)).read_text()
    assert "<th>both</th><th>c</th>" in html
    empty = make_run(tmp_path / "e", n=0, baselines=False)
    html = write_report(empty).read_text()
    assert "No successful evaluation yet." in html


def test_bad_run_is_one_line_exit_2(tmp_path: Path) -> None:
    r = _cli(str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    run = make_run(tmp_path / "c", n=5)
    (run / "evals.jsonl").write_text('{"id": 0}\nnot json\n')
    r = _cli(str(run))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "corrupt" in r.stderr


def test_big_run_stays_small(tmp_path: Path) -> None:
    from evomerge.report.html import write_report

    html = write_report(make_run(tmp_path / "big", n=5000, per_example=4, popsize=20)).read_text()
    assert len(html.encode()) < 1_000_000


def test_generations_follow_the_optimizer_info() -> None:
    from evomerge.report.data import generations

    recs = [{"id": i, "info": {"generation": i // 3}} for i in range(7)]
    assert [len(g) for g in generations(recs, popsize=2)] == [3, 3, 1]
    assert [len(g) for g in generations([{"id": i} for i in range(5)], popsize=2)] == [2, 2, 1]
