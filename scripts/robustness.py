#!/usr/bin/env python3
"""Robustness grid of the training recipe: does it collapse to all-background when the batch or the rate changes?

Trains, each on 2 ranks under mpirun as scripts/demo.sh does, with the demo's flags otherwise:

* batch per rank {2, 4, 8} x learning rate {r/4, r/2, r} around the demo's rate r (1e-3: {2.5e-4, 5e-4, 1e-3};
  ``--default_rate 4e-4`` gives the grid of the recipe before, {1e-4, 2e-4, 4e-4}), 4 epochs each (the demo's
  budget: about 1,790 training images whatever the batch on the demo's data), or fewer (``--epochs``: the
  first epochs of the same run, as the schedule and the data order depend only on the step and the epoch; a later run
  with more epochs continues from the last one's checkpoint);
* the demo's own cell (batch 4, rate 1e-3; ``--default_rate`` for another recipe's) again with two more
  seeds: a recipe whose result depends on the seed by more than ``SEED_SPREAD`` is a lucky one; and that cell at
  twice its rate (the change that made the recipe before collapse);
* ``defaults``: no training flag at all, as ``mpirun -np N python train_hvd.py --data brats.h5`` runs
  (batch 128 per rank, the seed's rate 0.0005 scaled by the ranks, 10 epochs), always the full budget.

Each cell's figures go to ``OUT/CELL.json`` once it has finished; a rerun skips finished cells (``--redo``
runs them again) and a cell stopped half-way resumes from its last epoch checkpoint (the trainer's own
resume, under ``OUT/CELL/logs``). At the end (or with ``--table``) it prints a markdown table of each
cell's final validation Dice WT / TC / ET (slice-pooled, threshold 0.5, the trainer's), and whether it
collapsed: WT < 0.5, or TC or ET < 0.1, after the last epoch.

Example (the table in docs/TRAINING.md):
  .venv/bin/python scripts/robustness.py --data runs/demo/brats.h5 --out runs/robustness/after
  .venv/bin/python scripts/robustness.py --data runs/demo/brats.h5 --out runs/robustness/before \
      --trainer /path/to/old/train_hvd.py --default_rate 1e-4
``--flags`` gives the trainer flags of every grid cell besides its batch, rate and seed: by default the
demo's (``DEMO_FLAGS``, as scripts/demo.sh passes them); a candidate change is measured on its own by
adding to them, an older recipe's by replacing them (``--flags ""``: the trainer's defaults). ``--cells``
runs a subset. ``--score_cases DIR`` scores each cell's model on a folder of cases that train no cell as the
demo scores its test cases (volume Dice, the lowest case, HD95 WT: what the slice-pooled validation Dice does not
see, such as a false component far from the tumour). ONEDNN_MAX_CPU_ISA is left as the environment has it
(unset: the CPU's native kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = (2, 4, 8)
RATE_STEPS = (0.25, 0.5, 1.0)     # the grid's rates as fractions of the default cell's
DEFAULT_CELL = (4, 1e-3)          # the demo's batch per rank and rate (--default_rate: another rate's cell)
SEEDS = (816, 1, 2)               # the trainer's default seed, and the default cell's two other ones
# scripts/demo.sh's training flags besides batch, rate and epochs (one inter-op thread: a normalised network's
# weights are then the same from run to run, docs/PERFORMANCE.md)
DEMO_FLAGS = "--norm batch --aug_bias 0.1 --num_inter_threads 1"
EPOCHS = 4                        # the demo's
COLLAPSE = {"WT": 0.5, "TC": 0.1, "ET": 0.1}   # final validation Dice below any of these: collapsed
SEED_SPREAD = 0.03                # the default cell's seeds may differ by at most this per region
HD95_WT_MAX = 4.0                 # mm: the demo's target for the whole tumour's HD95 (docs/TRAINING.md)
REGIONS = ("WT", "TC", "ET")
VAL_LINE = re.compile(r"^validation epoch (\d+) step (\d+) loss \S+ (.*)$")


def rate_name(rate: float) -> str:
    """1e-3 -> '1e-3', 2.5e-4 -> '2.5e-4' (a cell's name)."""
    mantissa, exponent = f"{rate:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def grid_rates(default_rate: float = DEFAULT_CELL[1]) -> list[float]:
    """The grid's rates: ``RATE_STEPS`` of the default cell's, rounded to 3 significant digits."""
    return [float(f"{default_rate * f:.3g}") for f in RATE_STEPS]


def cells(default_rate: float = DEFAULT_CELL[1]) -> list[dict]:
    """The grid, the default cell's other seeds, that cell at twice its rate, and the flag defaults, in the
    order they run."""
    out = [dict(name=f"b{b}_lr{rate_name(r)}", batch=b, rate=r, seed=SEEDS[0])
           for b in BATCHES for r in grid_rates(default_rate)]
    b, r = DEFAULT_CELL[0], default_rate
    out += [dict(name=f"b{b}_lr{rate_name(r)}_seed{s}", batch=b, rate=r, seed=s) for s in SEEDS[1:]]
    out.append(dict(name=f"b{b}_lr{rate_name(2 * r)}", batch=b, rate=2 * r, seed=SEEDS[0]))
    out.append(dict(name="defaults", batch=None, rate=None, seed=None))
    return out


def cell_command(cell: dict, a) -> list[str]:
    """The trainer's command line of one cell (``--fresh`` is not given: a stopped cell resumes)."""
    logdir = os.path.join(a.out, cell["name"], "logs")
    cmd = ["mpirun", "-np", str(a.np), "--oversubscribe"]
    if a.preload:
        cmd += ["-x", f"LD_PRELOAD={a.preload}"]
    cmd += [sys.executable, a.trainer, "--data", a.data]
    if cell["batch"] is not None:
        cmd += ["--batch_size", str(cell["batch"]), "--learningrate", repr(cell["rate"]), "--epochs", str(a.epochs),
                "--seed", str(cell["seed"])]
        cmd += shlex.split(a.flags)
    return cmd + ["--log_every", "10", "--logdir", logdir, "--export", "none"]


def comparable(cmd: list[str]) -> list[str]:
    """The command but its ``-x LD_PRELOAD=...`` (an allocator changes the speed, not the figures) and the value
    of ``--epochs`` (fewer epochs are the start of the same run)."""
    out = []
    for i, w in enumerate(cmd):
        if w == "-x" and i + 1 < len(cmd) and cmd[i + 1].startswith("LD_PRELOAD="):
            continue
        if i and (w.startswith("LD_PRELOAD=") and cmd[i - 1] == "-x" or cmd[i - 1] == "--epochs"):
            continue
        out.append(w)
    return out


def first_epochs(result: dict, epochs: int) -> dict:
    """A finished cell's figures after its first ``epochs`` epochs."""
    history = result["validation"][:epochs]
    return dict(result, validation=history, final=history[-1], collapsed=collapsed(history[-1]), epochs=len(history))


def validation_history(training_log: str) -> list[list[float]]:
    """Validation Dice per epoch, from the trainer's training.log (a resumed run appends: last line wins)."""
    epochs: dict[int, list[float]] = {}
    with open(training_log) as fh:
        for line in fh:
            m = VAL_LINE.match(line.strip())
            if m:
                d = dict(re.findall(r"dice_(\w+) ([\d.]+)", m.group(3)))
                epochs[int(m.group(1))] = [float(d[r]) for r in REGIONS]
    return [epochs[e] for e in sorted(epochs)]


def collapsed(final: list[float]) -> bool:
    return any(v < COLLAPSE[r] for r, v in zip(REGIONS, final))


def git_commit(trainer: str) -> str:
    """The commit of the trainer's checkout (a copy made by ``git archive`` names it in SOURCE_COMMIT)."""
    folder = os.path.dirname(os.path.abspath(trainer))
    if os.path.exists(os.path.join(folder, "SOURCE_COMMIT")):
        with open(os.path.join(folder, "SOURCE_COMMIT")) as fh:
            return fh.read().strip()
    git = ["git", "-C", folder]
    top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True, text=True).stdout.strip()
    if os.path.realpath(top or "/nonexistent") != os.path.realpath(folder):
        return "unknown"
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "unet", "train_hvd.py"], capture_output=True,
                           text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def run_cell(cell: dict, a) -> dict | None:
    path = os.path.join(a.out, cell["name"] + ".json")
    cmd = cell_command(cell, a)
    want = a.epochs if cell["batch"] is not None else 0
    if os.path.exists(path) and not a.redo:
        with open(path) as fh:
            done = json.load(fh)
        if comparable(done["command"]) != comparable(cmd):
            sys.exit(f"robustness.py: error: {path} was run with another command; --redo, or another --out")
        if len(done["validation"]) >= want:
            return first_epochs(done, want) if want else done
        # fewer epochs so far: the trainer continues from the cell's last checkpoint
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    os.makedirs(os.path.join(a.out, cell["name"]), exist_ok=True)
    print(f"==> {cell['name']}: {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    with open(os.path.join(a.out, cell["name"], "stdout.log"), "a") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    if rc:
        print(f"    {cell['name']}: the trainer exited with {rc} (see {a.out}/{cell['name']}/stdout.log)", flush=True)
        return None
    history = validation_history(os.path.join(a.out, cell["name"], "logs", "training.log"))
    result = dict(cell, command=cmd, trainer=a.trainer, trainer_commit=git_commit(a.trainer), epochs=len(history),
                  flags=a.flags, wall_s=round(wall, 1), validation=history, final=history[-1],
                  collapsed=collapsed(history[-1]), onednn_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "native"))
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, path)
    print(f"    {cell['name']}: final WT/TC/ET " + " / ".join(f"{v:.3f}" for v in result["final"])
          + (" COLLAPSED" if result["collapsed"] else "") + f" ({wall:.0f} s)", flush=True)
    return result


def held_out_dice(logdir: str, data: str, batch: int = 16) -> list[float]:
    """The trainer's validation Dice (slice-pooled sums at threshold 0.5: ``dice_sums``, ``dice_from_sums``) of
    a cell's final weights (its last checkpoint, the epoch of the ``final`` column) on the validation split of
    another file: cases that neither train the cell nor pick its epoch."""
    import keras

    from unet.data.pipeline import val_batches
    from unet.data.sources import DataOptions, open_sources
    from unet.training.checkpoint import list_checkpoints, load_checkpoint
    from unet.training.losses import dice_from_sums
    from unet.training.validation import pooled_sums
    _, val, info = open_sources(DataOptions(data=data))
    if val is None:
        sys.exit(f"robustness.py: error: --score {data}: the file has no validation split")
    model = keras.models.load_model(os.path.join(logdir, "model.keras"), compile=False)
    load_checkpoint(list_checkpoints(os.path.join(logdir, "checkpoints"))[-1], model=model, optimizer=None)
    sums, _, _ = pooled_sums(model.predict_on_batch, val_batches(val, batch_size=batch, rank=0, size=1),
                             regions=info.regions)
    return [round(float(v), 4) for v in dice_from_sums(sums)]


def add_score(result: dict, a) -> dict:
    """``result`` with its held-out Dice on ``--score``'s file (computed once per file, kept in the cell's JSON)."""
    path = os.path.join(a.out, result["name"] + ".json")
    with open(path) as fh:
        ran = json.load(fh)
    if not a.score or a.score in result.get("scores", {}) or len(ran["validation"]) != len(result["validation"]):
        return result            # scored already, or the run went on past these epochs: its weights are later ones
    print(f"    {result['name']}: scoring the final weights on {a.score}", flush=True)
    result = dict(result, scores=dict(result.get("scores", {}), **{
        a.score: held_out_dice(os.path.join(a.out, result["name"], "logs"), a.score)}))
    with open(path + ".tmp", "w") as fh:
        json.dump(dict(ran, scores=result["scores"]), fh, indent=1)
    os.replace(path + ".tmp", path)
    return result


def case_scores(logdir: str, cases: str, csv_path: str, np_: int) -> dict:
    """A cell's model scored as scripts/demo.sh scores its test cases (``unet-evaluate --model --cases --tta lr``,
    the default post-processing, volume-level figures): the mean volume Dice per region, the lowest case's, the
    mean and median HD95 of WT (mm) and how many cases have an HD95 WT above ``HD95_WT_MAX``."""
    import csv

    import numpy as np
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", sys.executable, "-m", "unet.evaluation.evaluate",
           "--model", logdir, "--cases", cases, "--tta", "lr", "--metrics", "legacy", "--csv", csv_path]
    with open(csv_path + ".log", "w") as out:
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode:
            sys.exit(f"robustness.py: error: scoring {logdir} on --score_cases {cases} failed (see {csv_path}.log)")
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    dice = np.array([[float(r[f"dice_{g}"]) for g in REGIONS] for r in rows])
    hd = np.array([float(r["hd95_WT"]) for r in rows])
    return dict(cases=len(rows), dice=[round(float(v), 4) for v in dice.mean(0)],
                lowest=[round(float(v), 4) for v in dice.min(0)], hd95_wt=round(float(hd.mean()), 2),
                hd95_wt_median=round(float(np.median(hd)), 2), hd95_wt_over=int((hd > HD95_WT_MAX).sum()))


def add_case_scores(result: dict, a) -> dict:
    """``result`` with its figures on ``--score_cases`` (computed once per folder, kept in the cell's JSON)."""
    path = os.path.join(a.out, result["name"] + ".json")
    with open(path) as fh:
        ran = json.load(fh)
    if (not a.score_cases or a.score_cases in result.get("case_scores", {})
            or len(ran["validation"]) != len(result["validation"])):
        return result
    print(f"    {result['name']}: scoring the model on {a.score_cases}", flush=True)
    logdir = os.path.join(a.out, result["name"], "logs")
    got = case_scores(logdir, a.score_cases, os.path.join(a.out, result["name"], "cases.csv"), a.np)
    result = dict(result, case_scores=dict(result.get("case_scores", {}), **{a.score_cases: got}))
    with open(path + ".tmp", "w") as fh:
        json.dump(dict(ran, case_scores=result["case_scores"]), fh, indent=1)
    os.replace(path + ".tmp", path)
    return result


def seed_spread(finals: list[list[float]]) -> float:
    """The largest difference between two runs' final Dice in any region."""
    return max(max(f[i] for f in finals) - min(f[i] for f in finals) for i in range(len(REGIONS)))


def table(results: list[dict], default_rate: float = DEFAULT_CELL[1], score: str = "", score_cases: str = "") -> str:
    """The cells' markdown table and the verdicts; ``score``: a file whose held-out Dice (``add_score``)
    gets a column and a seed verdict of its own; ``score_cases``: a folder of cases whose volume figures
    (``add_case_scores``) get two columns and a seed verdict."""
    held = f" held-out Dice WT / TC / ET ({os.path.basename(score)}) |" if score else ""
    if score_cases:
        held += (f" {os.path.basename(score_cases)}: volume Dice WT / TC / ET (lowest case) |"
                 f" HD95 WT mean, median (cases > {HD95_WT_MAX:g} mm) |")
    rows = ["| cell | batch/rank | rate | seed | epochs | final val Dice WT / TC / ET |" + held + " WT by epoch | "
            "largest fall between epochs | collapsed | wall (s) |",
            "|---" * (10 + bool(score) + 2 * bool(score_cases)) + "|"]
    for r in results:
        h = r["validation"]
        fall = max([h[e][i] - h[e + 1][i] for e in range(len(h) - 1) for i in range(3)] + [0.0])
        got = r.get("scores", {}).get(score)
        rows.append(f"| {r['name']} | {r['batch'] or 128} | {r['rate'] or 0.0005} | {r['seed'] or 816} | {len(h)} | "
                    + " / ".join(f"{v:.3f}" for v in r["final"]) + " | "
                    + ((" / ".join(f"{v:.3f}" for v in got) if got else "–") + " | " if score else "")
                    + (cases_cells(r.get("case_scores", {}).get(score_cases)) if score_cases else "")
                    + " ".join(f"{e[0]:.2f}" for e in h)
                    + f" | {fall:.3f} | " + ("**yes**" if r["collapsed"] else "no") + f" | {r['wall_s']:.0f} |")
    done = {r["name"]: r for r in results}
    b, rate = DEFAULT_CELL[0], default_rate
    names = [f"b{b}_lr{rate_name(rate)}"] + [f"b{b}_lr{rate_name(rate)}_seed{s}" for s in SEEDS[1:]]
    runs = [(s, done[n]) for s, n in zip(SEEDS, names) if n in done]
    lines = ["\n".join(rows), "", f"collapsed: {sum(r['collapsed'] for r in results)} of {len(results)} cells"]
    if len(runs) > 1:
        spread = seed_spread([r["final"] for _, r in runs])
        lines.append(f"default cell, seeds {', '.join(str(s) for s, _ in runs)}: largest difference {spread:.3f} "
                     f"({'within' if spread <= SEED_SPREAD else 'beyond'} {SEED_SPREAD})")
        scored = [(s, r["scores"][score]) for s, r in runs if score and score in r.get("scores", {})]
        if len(scored) > 1:
            spread = seed_spread([d for _, d in scored])
            lines.append(f"default cell on {os.path.basename(score)}'s validation split, seeds "
                         f"{', '.join(str(s) for s, _ in scored)}: largest difference {spread:.3f} "
                         f"({'within' if spread <= SEED_SPREAD else 'beyond'} {SEED_SPREAD})")
        cased = [(s, r["case_scores"][score_cases]["dice"]) for s, r in runs
                 if score_cases and score_cases in r.get("case_scores", {})]
        if len(cased) > 1:
            spread = seed_spread([d for _, d in cased])
            lines.append(f"default cell on {os.path.basename(score_cases)}'s cases (volume Dice), seeds "
                         f"{', '.join(str(s) for s, _ in cased)}: largest difference {spread:.3f} "
                         f"({'within' if spread <= SEED_SPREAD else 'beyond'} {SEED_SPREAD})")
    return "\n".join(lines)


def cases_cells(got: dict | None) -> str:
    """The two table cells of a cell's ``case_scores`` on one folder ("–" when not scored)."""
    if not got:
        return "– | – | "
    return (" / ".join(f"{v:.3f}" for v in got["dice"]) + " (" + " / ".join(f"{v:.3f}" for v in got["lowest"])
            + f") | {got['hd95_wt']:.2f}, {got['hd95_wt_median']:.2f} ({got['hd95_wt_over']} of {got['cases']}) | ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="robustness.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", help="HDF5 file of unet-convert (the demo's: runs/demo/brats.h5)")
    p.add_argument("--out", help="folder of the cells' JSON results and training logs")
    p.add_argument("--trainer", default=os.path.join(ROOT, "train_hvd.py"),
                   help="train_hvd.py to run (another checkout's, for the figures of an older recipe)")
    p.add_argument("--flags", default=DEMO_FLAGS,
                   help=f"trainer flags of every grid cell besides batch, rate and seed (not of 'defaults'; "
                        f"default: the demo's, {DEMO_FLAGS!r})")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help=f"epochs of each grid cell (the demo's {EPOCHS}: its image budget; fewer for a first look, "
                        "continued later by a run with more; 'defaults' always runs its own 10)"),
    p.add_argument("--default_rate", type=float, default=DEFAULT_CELL[1],
                   help="rate of the default cell, the one run again with other seeds and at twice the rate; the "
                        "grid's rates are fractions of it (the recipe before: 4e-4, with --epochs 3 --flags '')")
    p.add_argument("--cells", default="", help="comma-separated cell names to run (default: all); see --list")
    p.add_argument("--np", type=int, default=2, help="ranks (mpirun -np)")
    p.add_argument("--preload", default="", help="library to LD_PRELOAD in every rank (e.g. an allocator)")
    p.add_argument("--score", default="",
                   help="HDF5 file of other cases (unet-convert of cases that train no cell, e.g. --val_fraction "
                        "0.99): each cell's final weights are scored on its validation split with the trainer's "
                        "Dice, a column and a seed verdict of their own (the 2 validation cases of --data decide "
                        "the final column by one case's false positives: docs/TRAINING.md)")
    p.add_argument("--score_cases", default="",
                   help="dataset root of NIfTI cases that train no cell (e.g. unet-synth --seed 3): each cell's model "
                        "is scored on them as scripts/demo.sh scores its test cases (unet-evaluate --tta lr, the "
                        "default post-processing): volume Dice, the lowest case, HD95 WT; two columns and a seed "
                        "verdict of their own")
    p.add_argument("--redo", action="store_true", help="run finished cells again")
    p.add_argument("--table", action="store_true", help="print the table of the finished cells and stop")
    p.add_argument("--list", action="store_true", help="print the cell names and stop")
    a = p.parse_args(argv)
    grid = cells(a.default_rate)
    if a.list:
        print("\n".join(c["name"] for c in grid))
        return 0
    names = [c["name"] for c in grid]
    for flag in ("data", "out"):
        if not getattr(a, flag):
            p.error(f"--{flag} is required")
    wanted = [n for n in a.cells.split(",") if n] or names
    bad = [n for n in wanted if n not in names]
    if bad:
        p.error(f"--cells: unknown cell {bad[0]!r} (known: {', '.join(names)})")
    if a.epochs < 1:
        p.error(f"--epochs must be >= 1 (got {a.epochs})")
    if not os.path.isfile(a.data):
        p.error(f"--data {a.data}: no such file")
    if not os.path.isfile(a.trainer):
        p.error(f"--trainer {a.trainer}: no such file")
    if a.score and not os.path.isfile(a.score):
        p.error(f"--score {a.score}: no such file")
    if a.score_cases and not os.path.isdir(a.score_cases):
        p.error(f"--score_cases {a.score_cases}: no such folder")
    a.score = os.path.abspath(a.score) if a.score else ""
    a.score_cases = os.path.abspath(a.score_cases) if a.score_cases else ""
    a.data, a.out, a.trainer = os.path.abspath(a.data), os.path.abspath(a.out), os.path.abspath(a.trainer)
    os.makedirs(a.out, exist_ok=True)
    results = []
    by_name = {c["name"]: c for c in grid}
    for cell in [by_name[n] for n in wanted]:    # in the order asked for
        if a.table:
            path = os.path.join(a.out, cell["name"] + ".json")
            if os.path.exists(path):
                with open(path) as fh:
                    done = json.load(fh)
                want = a.epochs if cell["batch"] is not None else 0
                if len(done["validation"]) >= want:
                    results.append(first_epochs(done, want) if want else done)
            continue
        r = run_cell(cell, a)
        if r:
            results.append(add_case_scores(add_score(r, a), a))
    print(f"\nrobustness: {a.out} (data {a.data}, {a.np} ranks, {a.epochs} of the demo's {EPOCHS} epochs)")
    print(table(results, a.default_rate, a.score, a.score_cases) if results else "no finished cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
