"""Experiments: N trials as one local experiment (`lora-explorer sweep`: one process, the base model
loaded once) against the same N trials as N separate `lora-explorer train` runs, each paying its
own interpreter start, imports and model load, as a user would start them; both in one run of the
bench, alternating which goes first in each round. With --ray, the same trials also run as one
`sweep --ray` experiment on a local Ray (2 CPUs) that the bench starts.

Goal (issue 13): a local experiment costs at most 1.1x the sum of its trials' training time.
A trial's training time is the store's `elapsed` at its last point: from the Trainer's start of
training to the end of its last step or evaluation (the before-training evaluation after step 1,
the periodic and the final one included). What the goal bounds is everything else: the
interpreter's start and imports, loading the model and data, tokenizing, adding and removing the
adapter, and saving it. An experiment's cost is its process's wall time, from start to exit.

Each process is `python -m lora_core` as the user runs it, with a counter around the model loader
(`lora_core.training.run.load_model_and_tokenizer`) that prints how often it was called.

Run: `.venv/bin/python bench/bench_sweep.py [--trials 4 | --grid r=4,16 ...] [--steps 20] [--rounds 2]
[--ray] [--json]` (embedded SmolLM2-135M-Instruct, json_extraction, batch 4 x 128 tokens, CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_core.errors import InputError
from lora_core.settings import LoraSettings
from lora_core.store import Store

GOAL = 1.1
DEFAULT_GRID = ("targets=Q,V|All linear", "r=4,16")
# The CLI's defaults for trials the grid does not set, so `train` and `sweep` get the same flags.
BASE_SETTINGS = LoraSettings(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
LOADS_MARK = "bench-sweep model loads:"
# `python -m lora_core ARGS`, with the model loader counted; the count goes to stderr at exit.
COUNTED_CLI = f"""
import atexit, sys
import lora_core.training.run as run
calls = []
load = run.load_model_and_tokenizer
def counted(*args, **kwargs):
    calls.append(args)
    return load(*args, **kwargs)
run.load_model_and_tokenizer = counted
atexit.register(lambda: print("{LOADS_MARK}", len(calls), file=sys.stderr))
sys.argv[0] = "lora-explorer"
from lora_core.cli import run as cli
cli()
"""
# A local Ray head with 2 CPUs, held by this process until its stdin closes, then shut down:
# the bench ends the cluster it started, and no one else's. A new local Ray turns on token
# authentication ($RAY_AUTH_MODE), which a process joining it by address must be told.
RAY_HEAD = """
import json, os, sys, time
start = time.perf_counter()
import ray
imported = time.perf_counter()
context = ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
ready = time.perf_counter()
print(json.dumps({"address": context.address_info["gcs_address"], "import_s": imported - start,
                  "init_s": ready - imported, "auth_mode": os.environ.get("RAY_AUTH_MODE")}), flush=True)
sys.stdin.read()
ray.shutdown()
"""


@dataclass(frozen=True)
class Trial:
    """One trial's run as the store holds it."""

    label: str
    status: str
    training: float  # the last point's elapsed: see the module docstring
    span: float  # the run's started -> finished
    started: float
    finished: float
    trained_by: str
    config: dict
    settings: dict


@dataclass(frozen=True)
class Process:
    """One `python -m lora_core ...` process: its wall clock start and end, and loader calls."""

    start: float
    end: float
    model_loads: int | None

    @property
    def wall(self) -> float:
        return self.end - self.start


@dataclass
class Method:
    """One way of training the trials: its processes and the trials they trained."""

    name: str
    processes: list[Process]
    trials: list[Trial]
    extra: dict = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return sum(p.wall for p in self.processes)

    @property
    def training(self) -> float:
        return sum(t.training for t in self.trials)

    @property
    def ratio(self) -> float:
        return self.wall / self.training

    def concurrency(self) -> int:
        """The most trials that were training at one moment."""
        edges = sorted([(t.started, 1) for t in self.trials] + [(t.finished, -1) for t in self.trials])
        running = most = 0
        for _, change in edges:
            running += change
            most = max(most, running)
        return most

    def breakdown(self) -> dict[str, float]:
        """Where the wall time outside training went, summed over processes (seconds): before each
        process's first run started, inside runs (loading, tokenizing, adding the adapter, saving
        it), and after its last run ended; with trials one after another, also between runs."""
        parts = {
            "start_to_first_run": sum(min(t.started for t in self._of(p)) - p.start for p in self.processes),
            "in_runs_outside_training": sum(t.span - t.training for t in self.trials),
            "last_run_to_exit": sum(p.end - max(t.finished for t in self._of(p)) for p in self.processes),
        }
        if self.concurrency() == 1:
            parts["between_runs"] = self.wall - self.training - sum(parts.values())
        return parts

    def _of(self, process: Process) -> list[Trial]:
        return [t for t in self.trials if process.start <= t.started <= process.end] or self.trials


def lora_core_command(arguments: list[str]) -> list[str]:
    return [sys.executable, "-c", COUNTED_CLI, *arguments]


def run_process(arguments: list[str], data_dir: Path, extra_env: dict | None = None) -> tuple[Process, str]:
    """Run `python -m lora_core ARGUMENTS` (counted) against the store in `data_dir`; returns the
    process's times and its stdout. Exits the bench with the process's stderr when it fails."""
    env = {**os.environ, "LORA_EXPLORER_DATA": str(data_dir), **(extra_env or {})}
    start = time.time()
    done = subprocess.run(lora_core_command(arguments), env=env, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        said = (done.stdout.strip().splitlines() or [""])[-1][-1000:]  # with --json, the run's error
        raise SystemExit(f"{arguments[0]} exited {done.returncode}: {said}\n{done.stderr[-3000:]}")
    loads = re.search(rf"{LOADS_MARK} (\d+)", done.stderr)
    return Process(start, end, int(loads[1]) if loads else None), done.stdout


def common_flags(args: argparse.Namespace) -> list[str]:
    """The flags `train` and `sweep` share, with the values the bench trains at."""
    return [
        *("--model", "embedded", "--dataset", args.dataset, "--steps", str(args.steps)),
        *("--lr", str(args.lr), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)),
        *("--eval-every", str(args.eval_every), "--device", "cpu"),
    ]


def separate_runs(args: argparse.Namespace, plan, data_dir: Path) -> Method:
    """Each trial as its own `train` process, its LoRA settings in an adapter_config.json."""
    processes = []
    for trial in plan.trials:
        config_file = data_dir / f"trial-{trial.index}.json"
        config_file.write_text(json.dumps(trial.settings.to_peft_dict()))
        flags = [*common_flags(args), "--lora", str(config_file), "--name", trial.label, "--json"]
        processes.append(run_process(["train", *flags], data_dir)[0])
    return Method("separate `train` runs", processes, read_trials(data_dir))


def experiment(args: argparse.Namespace, data_dir: Path, head: dict | None = None) -> Method:
    """The trials as one `sweep` process (on the Ray of `head`, from `ray_head`, when given)."""
    grid = [flag for item in args.grid for flag in ("--grid", item)]
    where = ["--ray", head["address"]] if head else ["--local"]
    auth = {"RAY_AUTH_MODE": head["auth_mode"]} if head and head["auth_mode"] else {}
    process, _ = run_process(["sweep", *common_flags(args), *grid, *where, "--json"], data_dir, auth)
    name = "one `sweep --ray` experiment" if head else "one local `sweep` experiment"
    return Method(name, [process], read_trials(data_dir))


def read_trials(data_dir: Path) -> list[Trial]:
    """Every run in the store, oldest first, with its training time from its stored points."""
    store = Store.open(data_dir)
    runs = store.runs().sort_values("id")
    metrics = store.metrics([int(i) for i in runs["id"]])
    last = metrics.groupby("run_id")["elapsed"].max()
    trials = []
    for run in runs.to_dict("records"):
        full = store.run(int(run["id"])) or {}
        label = str(full["name"]).split(": ", 1)[-1]
        if full["status"] != "completed":
            raise SystemExit(f"run {label!r} {full['status']}: {full.get('error')}")
        started, finished = float(full["started"]), float(full["finished"])
        trials.append(
            Trial(
                label,
                full["status"],
                float(last[int(run["id"])]),
                finished - started,
                started,
                finished,
                str(full.get("trained_by")),
                full["config"],
                full["settings"],
            )
        )
    return trials


@contextlib.contextmanager
def ray_head() -> Iterator[dict]:
    """A local Ray cluster of 2 CPUs for the duration; yields its address and start-up times."""
    process = subprocess.Popen(
        [sys.executable, "-c", RAY_HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        if not line:
            raise SystemExit("the local Ray head did not start")
        yield json.loads(line)
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def same_work(reference: Method, other: Method) -> list[str]:
    """How the two paths' trials differ in what they train (config and LoRA settings); [] if not."""
    if len(reference.trials) != len(other.trials):
        return [f"{len(reference.trials)} trials against {len(other.trials)}"]
    problems = []
    for a, b in zip(reference.trials, other.trials, strict=True):
        for part in ("config", "settings"):
            left, right = getattr(a, part), getattr(b, part)
            keys = sorted(k for k in {*left, *right} if left.get(k) != right.get(k))
            if keys:
                problems.append(f"{a.label}: {part} differs in {', '.join(keys)}")
    return problems


def warm_up(args: argparse.Namespace) -> float:
    """One untimed 1-step `train` run in a scratch store: the embedded model converted, and the
    interpreter, libraries, model files and dataset read into the OS cache. Returns its seconds."""
    from lora_core.embedded import ensure_embedded

    start = time.perf_counter()
    ensure_embedded()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-warm-") as scratch:
        flags = common_flags(args)
        flags[flags.index("--steps") + 1] = "1"
        run_process(["train", *flags, "--json"], Path(scratch))
    return time.perf_counter() - start


def report_method(method: Method) -> dict:
    """Print one method's trials and totals; returns its figures."""
    loads = [p.model_loads for p in method.processes]
    trainers = sorted({t.trained_by for t in method.trials})
    print(f"  {method.name}: {len(method.processes)} process(es), wall {method.wall:.1f} s")
    per_trial = method.processes if len(method.processes) == len(method.trials) > 1 else [None] * len(method.trials)
    for trial, process in zip(method.trials, per_trial, strict=True):
        tail = f", its process start->exit {process.wall:.1f} s" if process else ""
        print(f"    {trial.label:<22} training {trial.training:6.1f} s, run start->end {trial.span:6.1f} s{tail}")
    outside = method.wall - method.training
    print(f"    sum of training {method.training:.1f} s; wall - sum of training {outside:+.1f} s")
    parts = method.breakdown()
    print("    of which: " + ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in parts.items()))
    if method.concurrency() > 1:
        print(f"    trials overlapped: up to {method.concurrency()} trained at once")
    counted = "not counted" if None in loads else f"{sum(loads)} ({' + '.join(map(str, loads))})"
    print(
        f"    model loads counted in the `python -m lora_core` process(es): {counted};"
        f" trials trained in {len(trainers)} process(es)"
    )
    return {
        "name": method.name,
        "wall_s": method.wall,
        "trial_labels": [t.label for t in method.trials],
        "training_s": [t.training for t in method.trials],
        "run_span_s": [t.span for t in method.trials],
        "process_wall_s": [p.wall for p in method.processes],
        "sum_training_s": method.training,
        "ratio_wall_to_training": method.ratio,
        "outside_training_s": outside,
        "breakdown_s": parts,
        "model_loads": loads,
        "training_processes": len(trainers),
        **method.extra,
    }


def one_round(args: argparse.Namespace, plan, order: tuple[str, ...]) -> dict[str, Method]:
    """Each method in `order`, each in a fresh store in a temporary data dir."""
    methods: dict[str, Method] = {}
    for which in order:
        with tempfile.TemporaryDirectory(prefix=f"bench-sweep-{which}-") as scratch:
            data_dir = Path(scratch)
            if which == "separate":
                methods[which] = separate_runs(args, plan, data_dir)
            elif which == "local":
                methods[which] = experiment(args, data_dir)
            else:
                with ray_head() as head:
                    methods[which] = experiment(args, data_dir, head)
                methods[which].extra = {"ray_import_s": head["import_s"], "ray_init_s": head["init_s"]}
    return methods


def make_plan(args: argparse.Namespace):
    from lora_core.experiments import parse_grid, plan_experiment
    from lora_core.training import TrainConfig

    config = TrainConfig(
        dataset=args.dataset,
        steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=args.eval_every,
        device="cpu",
    )
    return plan_experiment(BASE_SETTINGS, config, parse_grid(args.grid))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    trials = parser.add_mutually_exclusive_group()
    trials.add_argument("--trials", type=int, help="N trials: r = 4, 8, 16, ... on q_proj,v_proj")
    trials.add_argument("--grid", action="append", help=f"sweep --grid items (default: {' '.join(DEFAULT_GRID)})")
    parser.add_argument("--steps", type=int, default=20, help="training steps per trial (sweep's default)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating which path goes first")
    parser.add_argument("--dataset", default="json_extraction")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--ray", action="store_true", help="also the same trials on a local Ray (2 CPUs)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object of every figure")
    args = parser.parse_args()
    if args.trials is not None:
        if not 1 <= args.trials <= 8:
            parser.error("--trials: give 1 to 8")
        args.grid = [f"r={','.join(str(4 * 2**k) for k in range(args.trials))}"]
    args.grid = args.grid or list(DEFAULT_GRID)
    if args.ray and importlib.util.find_spec("ray") is None:
        parser.error('--ray needs Ray: pip install -r requirements-ray.txt (or "ray[tune]")')
    return args


def main() -> None:
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each round shows as it ends, also in a log file
    try:
        plan = make_plan(args)
    except InputError as error:  # a bad --grid item or training value, in one line
        print(f"bench_sweep.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    # With --json the figures' JSON is the only thing on stdout; the readable lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        rounds, summary = measure(args, plan)
    if args.json:
        print(json.dumps({"args": vars(args), "rounds": rounds, "summary": summary}))


def measure(args: argparse.Namespace, plan) -> tuple[list[dict], dict]:
    """Every round of `plan`'s trials, printed as it ends, then the summary; returns (rounds'
    figures, summary)."""
    print(
        f"setup: embedded SmolLM2-135M-Instruct, {args.dataset}, batch {args.batch_size} x {args.seq_len} tokens,"
        f" {args.steps} steps, eval every {args.eval_every} (+ before training and at the end), CPU;"
        f" {len(plan.trials)} trials: {', '.join(t.label for t in plan.trials)} (grid {' '.join(args.grid)})"
    )
    print(f"load average at start: {load_average()} on {os.cpu_count()} cores")
    print(f"warm-up (untimed): embedded model converted and one 1-step `train` run in {warm_up(args):.1f} s")
    print(
        "training time of a trial: the store's `elapsed` at its last point, from the Trainer's start of"
        " training to the end of its last step or evaluation; wall: each process from start to exit"
    )
    rounds, measured = [], []
    for index in range(args.rounds):
        order = ("separate", "local") if index % 2 == 0 else ("local", "separate")
        order = (*order, "ray") if args.ray else order
        print(f"round {index + 1} ({' then '.join(order)}), load average {load_average()}:")
        methods = one_round(args, plan, order)
        figures = {which: report_method(methods[which]) for which in order}
        for which in order[1:]:
            differences = same_work(methods["separate"], methods[which])
            if differences:
                raise SystemExit(f"{methods[which].name} trained something else: {'; '.join(differences)}")
        print("    every method trained the same configs and LoRA settings (checked in the stores)")
        rounds.append({"order": order, "methods": figures})
        measured.append(methods)
    summary = summarise(measured, args.ray)
    print(f"load average at end: {load_average()}")
    return rounds, summary


def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def listing(values: list[float], unit: str = "x", digits: int = 3) -> str:
    """ "median 1.050x of 1.040x, 1.060x" """
    return (
        f"median {statistics.median(values):.{digits}f}{unit} of {', '.join(f'{v:.{digits}f}{unit}' for v in values)}"
    )


def summarise(rounds: list[dict[str, Method]], ray: bool) -> dict:
    """The verdicts over all rounds: each figure per round, and its median."""
    ratio = [m["local"].ratio for m in rounds]
    outside = [m["local"].wall - m["local"].training for m in rounds]
    separate_outside = [m["separate"].wall - m["separate"].training for m in rounds]
    speedup = [m["separate"].wall / m["local"].wall for m in rounds]
    # Other processes slow the training far more than the fixed costs, which lowers the ratio:
    # the verdict takes the highest ratio, the round whose training was least slowed.
    met = max(ratio) <= GOAL
    print("summary (other people train on this 2-core VM at the same time: each figure per round, then the median):")
    print(
        f"  local experiment wall / sum of its trials' training time: {listing(ratio)}"
        f" (goal <= {GOAL}x, judged on the highest: {'met' if met else 'NOT met'})"
    )
    print(
        f"  reference, separate `train` runs' wall / sum of their training time: {listing([m['separate'].ratio for m in rounds])}"
    )
    print(f"  speedup, sum of separate runs' wall / experiment wall: {listing(speedup, digits=2)}")
    print(
        f"  wall outside training (what the goal bounds; less noisy than the walls, which include the"
        f" training itself): separate runs {listing(separate_outside, ' s', 1)};"
        f" experiment {listing(outside, ' s', 1)}"
    )
    print(
        f"  at this overhead the goal holds once an experiment's trials train for at least"
        f" {statistics.median(outside) / (GOAL - 1):.0f} s in all"
    )
    summary: dict = {
        "goal": GOAL,
        "ratio": ratio,
        "goal_met": met,
        "separate_ratio": [m["separate"].ratio for m in rounds],
        "speedup": speedup,
        "outside_training_s": outside,
        "separate_outside_training_s": separate_outside,
    }
    if ray:
        ray_ratio = [m["ray"].ratio for m in rounds]
        init = [m["ray"].extra["ray_init_s"] for m in rounds]
        print(
            f"  on Ray: experiment wall / sum of its trials' training time: {listing(ray_ratio)}"
            f" (up to {max(m['ray'].concurrency() for m in rounds)} trials at once on its 2 CPUs)"
        )
        print(
            f"  Ray's own overhead: ray.init of the 2-CPU local cluster {listing(init, ' s', 1)} (outside every wall)"
        )
        against = [(m["ray"].wall + m["ray"].extra["ray_init_s"]) / m["local"].wall for m in rounds]
        print(f"    Ray experiment wall + ray.init / local experiment wall: {listing(against)}")
        parts = {}
        for name in ("start_to_first_run", "in_runs_outside_training", "last_run_to_exit"):
            on_ray = [m["ray"].breakdown()[name] for m in rounds]
            local = [m["local"].breakdown()[name] for m in rounds]
            parts[name] = {"ray": on_ray, "local": local}
            print(f"    {name.replace('_', ' ')}: on Ray {listing(on_ray, ' s', 1)}; local {listing(local, ' s', 1)}")
        summary.update(ray_ratio=ray_ratio, ray_init_s=init, ray_wall_over_local=against, ray_against_local_s=parts)
    return summary


if __name__ == "__main__":
    main()
