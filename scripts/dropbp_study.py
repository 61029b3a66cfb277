"""DropBP convergence study on a real model: loss against steps and against training time, per method and rate.

    python scripts/fetch_smollm2.py                       # the real model, offline (SmolLM2-135M-Instruct, 30 layers)
    python scripts/dropbp_study.py                        # the standard plan: 17 runs, ~2.5 h on one CPU core
    python scripts/dropbp_study.py --report_only true     # tables and plots from the runs done so far

Every run is one fine-tuning job of lit_model.train (LoRA or full, on the digit tasks of lit_model.data.demo_tasks
or the sentence tasks of lit_model.data.sentence_tasks) and leaves `OUT/results/<run>.json`; runs whose result exists are
skipped, so the study resumes where it stopped and can be extended run by run. The report compares every DropBP
run with the rate-0 run of the same mode, task and seed: final validation loss, held-out exact match, training time
(steps and calibration only: start-up and evaluation are reported apart) and the time to reach a target training
loss (the baseline's smoothed loss halfway through its run). `OUT/report.md` holds the tables, `OUT/<mode>.png`
the loss against time and against steps.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from lit_model.train.args import DataArgs, DropBPArgs, EvalArgs, TrainArgs

# DropBP methods: name -> the --dropbp.* settings (besides the rate). "paper" is the published method.
METHODS: dict[str, dict[str, Any]] = {
    "paper": dict(sampler="independent", sensitivity_at=0.1),  # Bernoulli masks, sensitivity-allocated at 10%
    # ... with the one-pass sensitivity estimate instead of 2 * n_layer + 1 passes
    "paper-estimate": dict(sampler="independent", sensitivity_at=0.1, sensitivity="estimate"),
    "uniform": dict(sampler="independent", sensitivity_at=0.0),  # Bernoulli masks, one rate for every branch
    "stratified": dict(sampler="stratified", sensitivity_at=0.0),  # each branch kept exactly its share of steps
    "warmup": dict(sampler="independent", sensitivity_at=0.0, warmup=0.3),  # rates ramp up over 30% of training
    "prefix": dict(sampler="prefix", sensitivity_at=0.0),  # drop everything below a random cut
    "prefix-warmup": dict(sampler="prefix", sensitivity_at=0.0, warmup=0.3),
    # ours: exact gradients for what is kept (prefix), rates ramped up over 30% of training, and every branch's
    # learning rate scaled by 1 / (1 - p) so that its expected update matches the baseline's
    "ours": dict(sampler="prefix", sensitivity_at=0.0, warmup=0.3, scale_lr=True),
}
TASKS = ("digits", "sentences")
# Learning rates that suit each mode on SmolLM2-135M at batch 8 (LoRA r 8 / alpha 16 on query, value and MLP).
LEARNING_RATES = {"lora": 1e-3, "full": 5e-5}


@dataclass(frozen=True)
class Run:
    """One fine-tuning job of the study."""

    mode: str  # lora | full
    task: str  # digits | sentences
    method: str  # a key of METHODS, or "baseline" (rate 0)
    rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.task}-{self.method}-{self.rate:g}-s{self.seed}"


def standard_plan(seeds: tuple[int, ...] = (1337, 42)) -> list[Run]:
    """The runs behind BENCHMARKS.md's DropBP section, in the order they run (most informative first)."""
    runs: list[Run] = []
    for seed in seeds:  # LoRA on the digits: the paper's method against ours, both seeds
        runs += [Run("lora", "digits", "baseline", 0.0, seed), Run("lora", "digits", "paper", 0.5, seed),
                 Run("lora", "digits", "ours", 0.5, seed)]
    runs += [Run("full", "digits", m, r, seeds[0]) for m, r in (("baseline", 0.0), ("paper", 0.5), ("ours", 0.5))]
    runs += [Run("lora", "sentences", m, r, seeds[0]) for m, r in (("baseline", 0.0), ("paper", 0.5), ("ours", 0.5))]
    runs += [Run("lora", "digits", m, r, seeds[0]) for m, r in
             (("uniform", 0.5), ("prefix", 0.5), ("paper-estimate", 0.5), ("ours", 0.25), ("ours", 0.75))]
    return runs


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/dropbp_study"),
    plan: Optional[list[str]] = None,
    max_steps: int = 100,
    batch_size: int = 8,
    eval_interval: int = 25,
    exact_match: int = 60,
    report_only: bool = False,
) -> Path:
    """Run the study's plan (skipping runs already done), then write the report and the figures.

    Args:
        checkpoint_dir: the model (default: the real SmolLM2-135M-Instruct of scripts/fetch_smollm2.py).
        out_dir: where runs, results, report.md and the figures go.
        plan: runs as "mode-task-method-rate-sSEED" names (e.g. lora-digits-prefix-warmup-0.5-s1337); default the
            standard plan (`standard_plan`). Methods: baseline (rate 0) and the keys of METHODS.
        max_steps: optimizer steps per run.
        batch_size: samples per step (one micro-batch).
        eval_interval: steps between validation losses.
        exact_match: held-out samples for exact match at the start and the end of each run.
        report_only: only write the report and figures from the results there are.

    Returns:
        The report's path.
    """
    from tqdm import tqdm

    runs = [parse_run(name) for name in plan] if plan else standard_plan()
    results_dir = Path(out_dir) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if not (results_dir / f"{r.name}.json").is_file()]
    if not report_only:
        for run in tqdm(todo, desc="DropBP study", unit="run"):
            result = run_one(run, Path(checkpoint_dir), Path(out_dir), max_steps, batch_size, eval_interval,
                             exact_match)
            (results_dir / f"{run.name}.json").write_text(json.dumps(result, indent=1))
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    report = Path(out_dir) / "report.md"
    report.write_text(render_report(results))
    for mode in sorted({r["run"]["mode"] for r in results}):
        plot_mode(results, mode, Path(out_dir) / f"{mode}.png")
    print(report.read_text())
    return report


def parse_run(name: str) -> Run:
    """A Run from its name: mode-task-method-rate-sSEED (the method may itself contain dashes)."""
    parts = name.split("-")
    try:
        mode, task, *method, rate, seed = parts
        run = Run(mode, task, "-".join(method), float(rate), int(seed.removeprefix("s")))
    except ValueError as err:
        raise ValueError(f"Run {name!r} is not mode-task-method-rate-sSEED, e.g. lora-digits-uniform-0.5-s1337") from err
    problems = []
    if run.mode not in LEARNING_RATES:
        problems.append(f"mode {run.mode!r} (lora or full)")
    if run.task not in TASKS:
        problems.append(f"task {run.task!r} ({', '.join(TASKS)})")
    if run.method != "baseline" and run.method not in METHODS:
        problems.append(f"method {run.method!r} (baseline, {', '.join(METHODS)})")
    if (run.method == "baseline") != (run.rate == 0):
        problems.append("rate: the baseline runs at rate 0 and only the baseline does")
    if problems:
        raise ValueError(f"Run {name!r} has an unknown " + "; ".join(problems))
    return run


def run_one(run: Run, checkpoint_dir: Path, out_dir: Path, max_steps: int, batch_size: int, eval_interval: int,
            exact_match: int) -> dict[str, Any]:
    """Train one run and collect its curves: training loss and validation loss against step and training time."""
    from lit_model.peft.lora import LoRAConfig
    from lit_model.train import FinetuneJob, run as train

    data_dir = out_dir / "data" / run.task
    data = DataArgs(train_file=data_dir / "train.json", val_file=data_dir / "val.json")
    if not data.train_file.is_file():
        write_task(run.task, data_dir)
    dropbp = DropBPArgs(rate=run.rate, **(METHODS[run.method] if run.method != "baseline" else {}))
    job = FinetuneJob(
        checkpoint_dir=checkpoint_dir, out_dir=out_dir / "runs" / run.name, precision="32-true",
        devices=1, seed=run.seed, data=data,
        train=TrainArgs(global_batch_size=batch_size, micro_batch_size=batch_size, max_steps=max_steps,
                        learning_rate=LEARNING_RATES[run.mode], lr_warmup_steps=max(1, max_steps // 20)),
        # Validation on 80 samples (10 batches), exact match after training only: the model before training is
        # the same for every run of a task.
        eval=EvalArgs(interval=eval_interval, max_iters=10, exact_match=exact_match, exact_match_before=False,
                      max_new_tokens=24),
        adapter=LoRAConfig(r=8, alpha=16, query=True, value=True, mlp=True) if run.mode == "lora" else None,
        dropbp=dropbp,
    )
    t0 = time.perf_counter()
    metrics = train(job)
    wall = time.perf_counter() - t0
    train_curve, val_curve = read_curves(job.out_dir)
    return {"run": asdict(run), "metrics": metrics, "wall_s": wall, "train": train_curve, "val": val_curve,
            "settings": {"max_steps": max_steps, "batch_size": batch_size, "lr": LEARNING_RATES[run.mode],
                         "dropbp": asdict(dropbp)}}


def write_task(task: str, data_dir: Path) -> None:
    if task == "digits":
        from lit_model.data.demo_tasks import write_demo_dataset

        write_demo_dataset(data_dir)
    else:
        from lit_model.data.sentence_tasks import write_sentence_dataset

        write_sentence_dataset(data_dir)


def read_curves(run_dir: Path) -> tuple[list[list[float]], list[list[float]]]:
    """[(step, loss, train_time_s)] of training and of validation, from the run's metrics.csv."""
    train, val = [], []
    for path in sorted(run_dir.glob("logs/**/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("loss"):
                train.append([int(row["step"]), float(row["loss"]), float(row["train_time_s"])])
            if row.get("val_loss") and row.get("train_time_s"):
                val.append([int(row["step"]), float(row["val_loss"]), float(row["train_time_s"])])
    return train, val


# ---- the report ------------------------------------------------------------------------------------------------------


def smoothed(curve: list[list[float]], window: int = 10) -> list[tuple[int, float, float]]:
    """(step, mean loss of the last `window` steps, train time) for each step from the window-th on."""
    out = []
    for i in range(window - 1, len(curve)):
        losses = [c[1] for c in curve[i - window + 1 : i + 1]]
        out.append((int(curve[i][0]), sum(losses) / window, curve[i][2]))
    return out


def time_to(curve: list[list[float]], target: float) -> Optional[tuple[int, float]]:
    """(step, train time) at which the smoothed training loss first reaches `target`; None if it never does."""
    for step, loss, t in smoothed(curve):
        if loss <= target:
            return step, t
    return None


def render_report(results: list[dict[str, Any]]) -> str:
    """Markdown: per mode and task, each method and rate against the rate-0 run of the same seed."""
    by_key = {(r["run"]["mode"], r["run"]["task"], r["run"]["seed"]): r for r in results
              if r["run"]["method"] == "baseline"}
    lines = ["# DropBP study", ""]
    groups = sorted({(r["run"]["mode"], r["run"]["task"]) for r in results})
    for mode, task in groups:
        lines += [f"## {mode}, {task}", "",
                  "| method | rate | seeds | final val loss | held-out EM | train time (s) | of which calibration (s) "
                  "| steps to target | time to target vs rate 0 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for r in results:
            if (r["run"]["mode"], r["run"]["task"]) == (mode, task):
                cells.setdefault((r["run"]["method"], r["run"]["rate"]), []).append(r)
        order = sorted(cells, key=lambda k: (k[0] != "baseline", k[1], k[0]))
        for method, rate in order:
            rs = cells[(method, rate)]
            ratios, steps = [], []
            for r in rs:
                base = by_key.get((mode, task, r["run"]["seed"]))
                if base is None or not base["train"]:
                    continue
                half = smoothed(base["train"])
                target = half[len(half) // 2][1] if half else math.inf
                mine, theirs = time_to(r["train"], target), time_to(base["train"], target)
                if mine is None or theirs is None:
                    ratios.append(math.inf)
                    steps.append(None)
                else:
                    ratios.append(mine[1] / theirs[1])
                    steps.append(mine[0])
            lines.append("| " + " | ".join([
                method, f"{rate:g}", str(len(rs)),
                _spread([r["metrics"]["val_loss"] for r in rs], 3),
                _spread([r["metrics"].get("exact_match_after", float("nan")) for r in rs], 2),
                _spread([r["metrics"]["train_time_s"] for r in rs], 0),
                _spread([r["metrics"].get("calibration_time_s", 0.0) for r in rs], 0),
                ", ".join("not reached" if s is None else str(s) for s in steps) or "-",
                ", ".join("not reached" if math.isinf(x) else f"{x:.2f}x" for x in ratios) or "-",
            ]) + " |")
        lines.append("")
    lines += ["Target: the smoothed (10-step mean) training loss the rate-0 run of the same seed reaches halfway "
              "through its run. Time to target vs rate 0 < 1: that method got there faster. Times are training "
              "steps and calibration only (evaluation and start-up apart), on the machine that ran the study.", ""]
    return "\n".join(lines)


def _spread(values: list[float], digits: int) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def plot_mode(results: list[dict[str, Any]], mode: str, path: Path) -> Path:
    """One figure per mode: smoothed training loss (lines) and validation loss (dots) against training time (top)
    and against steps (bottom), one column per task, for the seed with the most runs of that task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in results if r["run"]["mode"] == mode]
    tasks = sorted({r["run"]["task"] for r in mine})
    fig, axes = plt.subplots(2, len(tasks), figsize=(7 * len(tasks), 8.5), dpi=110, squeeze=False)
    for col, task in enumerate(tasks):
        runs = [r for r in mine if r["run"]["task"] == task]
        seeds = [r["run"]["seed"] for r in runs]
        seed = max(sorted(set(seeds)), key=seeds.count)
        for row, (x, xlabel) in enumerate(((2, "training time (s)"), (0, "step"))):
            ax = axes[row][col]
            for r in sorted((r for r in runs if r["run"]["seed"] == seed),
                            key=lambda r: (r["run"]["method"] != "baseline", r["run"]["method"], r["run"]["rate"])):
                label = "rate 0" if r["run"]["method"] == "baseline" else f"{r['run']['method']} {r['run']['rate']:g}"
                curve = smoothed(r["train"])
                line, = ax.plot([c[x] for c in curve], [c[1] for c in curve], label=label, linewidth=1.4,
                                linestyle="-" if r["run"]["method"] in ("baseline", "ours") else "--")
                if r["val"]:
                    ax.plot([v[x] for v in r["val"]], [v[1] for v in r["val"]], "o", color=line.get_color(),
                            markersize=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss (train: 10-step mean; dots: validation)")
            ax.set_title(f"{mode}, {task} (seed {seed})")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from lit_model.cli import script_main

    script_main(main)
