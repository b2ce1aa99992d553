"""Reproduce the article's claims table (SPEC section 4) with one command.

  python experiments/reproduce.py --quick --out runs/claims_quick      # <= 30 min, 2 cores
  python experiments/reproduce.py --out runs/claims                    # the full runs (hours)
  python experiments/reproduce.py --only dsa_speed,gmoe_scale --out runs/claims
  python experiments/reproduce.py --recorded --out docs                # docs/claims.md

Each claim (`experiments/claims.py`: its configs, jobs and verdict rule) is measured by
jobs, each one command writing one JSON to OUT/claims/JOB.json (log: OUT/claims/logs/),
with trainer workdirs under OUT/claims/work/{quick,full}. Resumable: a job whose JSON
exists from the same command is not rerun, and its trainer workdirs resume. A failed job
is logged, the jobs that need it are skipped, the rest go on, and its claims read `not
comparable` (the exit status is then 1).

Written: OUT/claims.md (the table: the article's figure, ours, the verdict and why, the
commands, the machine), OUT/claims.json (the same with every figure) and OUT/claims.png
(ours over the article's figure, where both are one number of one unit), plus each job's
own plot beside its JSON when matplotlib is installed.

`--recorded` takes the JSON of every job that has a recorded full run in docs/figures
(the runs behind docs/results.md, with their own command and machine) instead of running
it, and runs only the others: that is how docs/claims.md is made without hours of
training. Without it, everything is measured now.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # Run as a script: make `experiments` importable.
  sys.path.insert(0, str(ROOT))

from experiments import claims as claims_lib  # noqa: E402
from experiments import common  # noqa: E402

RECORDED_DIR = ROOT / "docs" / "figures"


def select(only: str) -> list[claims_lib.Claim]:
  """The claims named in `only` (comma-separated; '' = all), in table order."""
  names = [n for n in only.split(",") if n]
  unknown = sorted(set(names) - set(claims_lib.CLAIMS))
  if unknown:
    raise SystemExit(f"reproduce: unknown claim(s) {unknown}; choose from "
                     f"{', '.join(claims_lib.CLAIMS)}.")
  return [c for n, c in claims_lib.CLAIMS.items() if not names or n in names]


def needed_jobs(claims: list[claims_lib.Claim]) -> list[claims_lib.Job]:
  """The claims' jobs and the jobs they need, in JOBS order (dependencies come first)."""
  wanted: set[str] = set()
  stack = [j for c in claims for j in c.jobs]
  while stack:
    name = stack.pop()
    if name not in wanted:
      wanted.add(name)
      stack.extend(claims_lib.JOBS[name].needs)
  return [job for name, job in claims_lib.JOBS.items() if name in wanted]


def run_job(job: claims_lib.Job, argv: list[str], out: pathlib.Path,
            log: pathlib.Path) -> tuple[int, float]:
  """Runs one job from the repository root; returns (exit status, seconds)."""
  command = [sys.executable, *argv] + ([] if job.stdout else ["--out", str(out)])
  start = time.perf_counter()
  with open(log, "w") as log_file:
    log_file.write(" ".join(command) + "\n")
    log_file.flush()
    if job.stdout:
      with open(out.with_suffix(".tmp"), "w") as stdout:
        status = subprocess.call(command, cwd=ROOT, stdout=stdout, stderr=log_file)
      if status == 0:
        out.with_suffix(".tmp").replace(out)
    else:
      status = subprocess.call(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
  return status, time.perf_counter() - start


def run_jobs(jobs: list[claims_lib.Job], args: argparse.Namespace,
             jobs_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
  """Runs (or resumes, or reads) every job; returns each one's record."""
  # Jobs run from the repository root: every path they get is absolute.
  work = os.path.abspath(args.workdir or jobs_dir / "work" / ("quick" if args.quick else "full"))
  (jobs_dir / "logs").mkdir(parents=True, exist_ok=True)
  records: dict[str, dict[str, Any]] = {}
  for job in jobs:
    argv = job.argv(args.quick, work)
    out = jobs_dir.resolve() / f"{job.name}.json"
    sidecar = jobs_dir / f"{job.name}.run.json"
    shown = common.command(argv[1], [os.path.relpath(a) if a.startswith(work) else a
                                     for a in argv[2:]])
    shown += "" if job.stdout else f" --out {os.path.relpath(out)}"
    record: dict[str, Any] = {"command": shown}
    recorded = RECORDED_DIR / job.recorded if job.recorded else None
    done = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    failed_needs = [n for n in job.needs if records.get(n, {}).get("status") not in
                    ("ran", "resumed", "recorded")]
    if args.recorded and recorded is not None and recorded.exists():
      record.update(status="recorded", json=str(recorded.relative_to(ROOT)),
                    command=json.loads(recorded.read_text()).get("command", "?"))
    elif done.get("argv") == argv and done.get("status") == 0 and out.exists():
      record.update(status="resumed", json=os.path.relpath(out), seconds=done["seconds"])
    elif failed_needs:
      record.update(status="skipped", why=f"needs {', '.join(failed_needs)}")
    else:
      print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {shown}", flush=True)
      log = jobs_dir / "logs" / f"{job.name}.log"
      status, seconds = run_job(job, argv, out, log)
      sidecar.write_text(json.dumps({"argv": argv, "status": status, "seconds": seconds}))
      record.update(status="ran" if status == 0 else "failed", json=os.path.relpath(out),
                    seconds=seconds, log=os.path.relpath(log))
      print(f"[{time.strftime('%H:%M:%S')}] {job.name}: "
            f"{'done' if status == 0 else f'FAILED (exit {status}), see {log}'} "
            f"in {seconds / 60:.1f} min", flush=True)
    records[job.name] = record
  return records


def git_commit() -> str:
  try:
    commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     text=True, stderr=subprocess.DEVNULL).strip()
    dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, text=True).strip()
    return commit + (" (with local changes)" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine_line(machine: dict[str, Any]) -> str:
  flags = [f for f in ("avx512", "amx") if machine.get(f)]
  backend, device = machine.get("backend", "?"), machine.get("device", "")
  return (f"{machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} cores"
          f"{', ' + ' + '.join(flags) if flags else ''}), JAX on {backend}"
          + (f" ({device})" if device and device != backend else ""))


def markdown(table: dict[str, Any]) -> str:
  """claims.md: the table, then per claim its configs, commands and machine."""
  lines = [
      "# The article's claims, reproduced",
      "",
      f"`{table['command']}` at commit {table['commit']}, {table['date']}: " + (
          "built from the recorded full runs in docs/figures (each job's command and "
          "machine are listed below); the jobs without a record ran now, in "
          if table["recorded"] else f"{table['mode']} run, ")
      + f"{table['minutes']:.1f} min on {machine_line(table['machine'])}.",
      "",
      "Each verdict follows the rule written in `experiments/claims.py` beside its reader.",
      "",
      "| claim | article | ours | verdict |",
      "|---|---|---|---|",
  ]
  for row in table["claims"]:
    lines.append(f"| {row['claim']} | {row['article']} | {row['ours']} | "
                 f"**{row['verdict']}**: {row['why']} |")
  lines += ["", "## Commands, configs and machines", ""]
  for row in table["claims"]:
    lines += [f"### {row['claim']} (`--only {row['name']}`)", "",
              f"What: {row['how']}. Config: `{row['config']}`"
              + (f"; at paper scale: `{row['paper']}`." if row["paper"] else "."), ""]
    for job in row["jobs"]:
      where = job.get("json", "")
      status = job["status"] + (f", {job['seconds'] / 60:.1f} min" if "seconds" in job else "")
      machine = (machine_line(job["machine"]) if job.get("machine") else
                 "machine not recorded in the JSON: see the section of docs/results.md "
                 "that cites it")
      lines.append(f"- `{job['command']}` ({status}; {where}; {machine})")
    lines.append("")
  return "\n".join(lines)


def plot(table: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in table["claims"] if r.get("ratio_to_article")]
  fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
  colors = {claims_lib.REPRODUCED: "tab:green", claims_lib.NOT_REPRODUCED: "tab:red",
            claims_lib.NOT_COMPARABLE: "tab:gray"}
  ratios = [r["ratio_to_article"] for r in rows]
  ax.scatter(ratios, range(len(rows)), s=80, zorder=3,
             color=[colors[r["verdict"]] for r in rows])
  for y, (ratio, row) in enumerate(zip(ratios, rows)):
    ax.annotate(f"{ratio:.2f}", (ratio, y), textcoords="offset points", xytext=(8, -4))
  ax.axvline(1.0, color="black", lw=1)
  ax.set_xscale("log")
  ax.set_xlim(min(ratios + [1.0]) / 1.5, max(ratios + [1.0]) * 1.5)
  ax.set_xticks([t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]])
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_yticks(range(len(rows)), [r["claim"] for r in rows])
  ax.invert_yaxis()
  ax.grid(axis="x", which="both", alpha=0.3)
  ax.set_xlabel("ours / the article's figure (green reproduced, red not, grey not comparable)")
  ax.set_title(f"Claims, {table['mode']} run" + (" (recorded)" if table["recorded"] else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="Output directory.")
  parser.add_argument("--quick", action="store_true", help="Every job at CPU-smoke size "
                      "(<= 30 min on 2 cores); training claims then have no verdict.")
  parser.add_argument("--only", default="", help="Claims to run, comma-separated: "
                      + ", ".join(claims_lib.CLAIMS))
  parser.add_argument("--recorded", action="store_true", help="Read recorded full runs from "
                      "docs/figures instead of running those jobs.")
  parser.add_argument("--workdir", default="", help="Trainer workdirs (default "
                      "OUT/claims/work/{quick,full}).")
  args = parser.parse_args(argv)
  if args.recorded and args.quick:
    parser.error("--recorded reads full runs; it does not combine with --quick.")
  claims = select(args.only)
  out = pathlib.Path(args.out)
  jobs_dir = out / "claims"
  start = time.perf_counter()
  records = run_jobs(needed_jobs(claims), args, jobs_dir)
  machine = common.machine()
  results = {}
  for name, record in records.items():
    if record["status"] in ("ran", "resumed", "recorded"):
      results[name] = json.loads((ROOT / record["json"]).read_text()
                                 if record["status"] == "recorded"
                                 else pathlib.Path(record["json"]).read_text())
      if "machine" in results[name]:
        record["machine"] = results[name]["machine"]
      elif record["status"] != "recorded":  # A CLI job (info, plan): it ran here.
        record["machine"] = machine
  rows = []
  for claim in claims:
    finding = claims_lib.find(claim, results, args.quick)
    rows.append({"name": claim.name, "claim": claim.claim, "article": claim.article,
                 "how": claim.how, "config": claim.config, "paper": claim.paper,
                 "jobs": [records[j] for j in claim.jobs],
                 "ours": finding.ours, "verdict": finding.verdict, "why": finding.why,
                 "figures": finding.figures, "ratio_to_article": finding.ratio_to_article})
  shown_argv = ["experiments/reproduce.py", *argv]
  table = {"command": " ".join(["python", *shown_argv]), "commit": git_commit(),
           "date": datetime.date.today().isoformat(), "mode": "quick" if args.quick else
           "full", "recorded": args.recorded,
           "minutes": (time.perf_counter() - start) / 60, "machine": machine,
           "claims": rows}
  out.mkdir(parents=True, exist_ok=True)
  (out / "claims.json").write_text(json.dumps(table, indent=2, default=str))
  (out / "claims.md").write_text(markdown(table) + "\n")
  print(f"wrote {out / 'claims.md'} and {out / 'claims.json'}")
  try:
    plot(table, str(out / "claims.png"))
    print(f"wrote {out / 'claims.png'}")
  except ImportError:
    print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
  for row in rows:
    print(f"  {row['claim']:<30} {row['verdict']:<15} {row['ours']}")
  return 1 if any(r["status"] in ("failed", "skipped") for r in records.values()) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
