"""experiments/reproduce.py and experiments/claims.py: every claim reads its recorded full
run into a verdict; jobs resume, fail without losing the others, and feed the table."""

import json
import subprocess
import sys

import pytest

from experiments import claims as claims_lib
from experiments import reproduce
from tests.helpers import REPO

SPEC_ROWS = ("DSA speed", "DSA quality", "DSA complexity", "GMoE scale", "GMoE efficiency",
             "layered remat", "QAT", "TP + PP", "long context", "RLHF", "long-text inference",
             "selective experts")


def test_every_spec_row_has_a_claim_with_configs_and_jobs():
  rows = {c.claim for c in claims_lib.CLAIMS.values()}
  assert set(SPEC_ROWS) <= rows
  for claim in claims_lib.CLAIMS.values():
    assert claim.config and claim.jobs and claim.article
    for spec in filter(None, (claim.config, claim.paper)):
      assert (REPO / spec.partition(":")[0]).exists(), spec
    for job in claim.jobs:
      assert set(claims_lib.JOBS[job].needs) <= set(claims_lib.JOBS)


def test_recorded_full_runs_give_every_claim_a_verdict(tmp_path):
  """docs/claims.md's command: recorded JSON for most jobs, `info` and `plan` run now."""
  status = subprocess.call([sys.executable, "experiments/reproduce.py", "--recorded",
                            "--out", str(tmp_path)], cwd=REPO)
  assert status == 0
  table = json.loads((tmp_path / "claims.json").read_text())
  assert [r["claim"] for r in table["claims"]] == [
      c.claim for c in claims_lib.CLAIMS.values()]
  for row in table["claims"]:
    assert row["verdict"] in (claims_lib.REPRODUCED, claims_lib.NOT_REPRODUCED,
                              claims_lib.NOT_COMPARABLE), row
    assert row["ours"] != "-", row  # Every reader found its figures.
  by_name = {r["name"]: r for r in table["claims"]}
  assert by_name["gmoe_scale"]["verdict"] == claims_lib.REPRODUCED  # 174.9B / 35.07B
  assert by_name["gmoe_scale"]["jobs"][0]["status"] == "ran"
  text = (tmp_path / "claims.md").read_text()
  assert all(f"| {row} |" in text for row in SPEC_ROWS)


def fake_claims(tmp_path):
  """Three jobs (one fails, one needs the failed one) and a claim on each."""
  good = tmp_path / "good.json"
  good.write_text(json.dumps({"x": 3}))
  jobs = {j.name: j for j in (
      claims_lib.Job("good", "json.tool", full=(str(good),), stdout=True),
      claims_lib.Job("bad", "json.tool", full=(str(tmp_path / "missing.json"),), stdout=True),
      claims_lib.Job("after", "json.tool", full=(str(good),), stdout=True, needs=("bad",)))}
  read = lambda res, quick: claims_lib.Finding(str(res["good"]["x"]), claims_lib.REPRODUCED, "")
  claims = {c.name: c for c in (
      claims_lib.Claim("c_good", "good", "3", "", "configs/tiny.py", "", ("good",), read),
      claims_lib.Claim("c_after", "after", "3", "", "configs/tiny.py", "", ("after",), read))}
  return jobs, claims


def test_failed_jobs_are_contained_and_finished_jobs_resume(tmp_path, monkeypatch):
  jobs, claims = fake_claims(tmp_path)
  monkeypatch.setattr(claims_lib, "JOBS", jobs)
  monkeypatch.setattr(claims_lib, "CLAIMS", claims)
  out = tmp_path / "out"
  assert reproduce.main(["--out", str(out)]) == 1  # 'bad' failed, 'after' skipped.
  table = json.loads((out / "claims.json").read_text())
  rows = {r["name"]: r for r in table["claims"]}
  assert rows["c_good"]["verdict"] == claims_lib.REPRODUCED and rows["c_good"]["ours"] == "3"
  assert rows["c_after"]["verdict"] == claims_lib.NOT_COMPARABLE
  assert rows["c_after"]["jobs"][0]["status"] == "skipped"
  assert "missing.json" in (out / "claims" / "logs" / "bad.log").read_text()
  # A second run reruns only what did not finish.
  reproduce.main(["--out", str(out), "--only", "c_good"])
  table = json.loads((out / "claims.json").read_text())
  assert table["claims"][0]["jobs"][0]["status"] == "resumed"


def test_unknown_claims_are_named():
  with pytest.raises(SystemExit, match="unknown claim.*nope"):
    reproduce.select("dsa_speed,nope")


@pytest.mark.slow
def test_quick_reproduction_writes_the_whole_table(tmp_path):
  """`reproduce.py --quick` end to end (about 25 minutes on 2 cores): every job finishes
  and every claim has its figure."""
  status = subprocess.call([sys.executable, "experiments/reproduce.py", "--quick",
                            "--out", str(tmp_path)], cwd=REPO)
  assert status == 0
  table = json.loads((tmp_path / "claims.json").read_text())
  assert all(row["ours"] != "-" for row in table["claims"]), table["claims"]
  assert (tmp_path / "claims.md").exists()
