"""Every parallel layout trains like one device: loss, gradients, MoE metrics, checkpoints.

Each test runs `python -m experiments.layouts` in a fresh process with 8 simulated CPU
devices; the unsharded single-device model is the oracle. The default suite covers each layout
once (models rotated); `-m slow` runs every layout with every model.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3  # Targets of docs/results.md 6.1 (f32).

DEFAULT_CASES = [  # Every mesh axis, each model, and accumulation, in five runs.
    ("fsdp8", "dsa"),
    ("dp2_tp4_accum2", "dense"),
    ("dp2_ep4", "moe"),
    # The DeepSeek-V2 layout (MLA + DeepSeekMoE, the same dispatch as GMoE's): heads over
    # tensor, one dense + two MoE layers over two stages.
    ("pp2_tp2_dp2", "v2"),
    # ... and ZeRO-3 with expert parallelism: MLA's latent widths over fsdp, the routed
    # experts over 4 with all-to-all (one process: the single-device V2 reference is shared).
    ("fsdp2_ep4", "v2"),
]
ALL_CASES = list(itertools.product(
    ("dp8", "fsdp8", "dp2_fsdp2_tp2", "dp2_tp4", "dp2_ep4", "fsdp2_ep4", "pp4_dp2",
     "pp2_tp2_dp2"),
    ("dense", "dsa", "moe", "v2")))  # A dense model on dp2_ep4: `expert` is one more data axis.


def run_check(*args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.layouts", *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert out["devices"] == 8
  return out["cases"]


def assert_matches_single_device(out: dict) -> None:
  for case, r in out.items():
    assert r["loss_rel"] <= LOSS_RTOL, (case, r["losses"], r["ref_losses"])
    assert r["grad_rel"] <= GRAD_RTOL, (case, r["worst_grad"], r["grad_rel"])
    # MoE aux loss, z-loss, load and dropped fraction: the same statistics as one device.
    assert all(v <= 1e-4 for v in r["metric_rel"].values()), (case, r["metric_rel"])


def test_each_layout_matches_single_device():
  out = run_check(json.dumps(DEFAULT_CASES))
  assert set(out) == {f"{layout}/{model}" for layout, model in DEFAULT_CASES}
  assert_matches_single_device(out)
  # Parameters (and so their Adam moments) are really split, per the logical rules.
  shard = lambda case, name: next(  # noqa: E731
      v for k, v in out[case]["shards"].items() if k.endswith(name))
  assert shard("fsdp8/dsa", "query/w") == [3, 4, 4, 8]  # embed over fsdp.
  assert shard("dp2_tp4_accum2/dense", "query/w") == [3, 32, 1, 8]  # heads over tensor.
  assert shard("dp2_tp4_accum2/dense", "ffn/up/w") == [3, 32, 16]  # mlp over tensor.
  assert shard("dp2_ep4/moe", "moe/w_in") == [2, 2, 32, 2, 32]  # 8 experts over 4.
  # MLA: the up-projections' heads over tensor; 2 MoE layers over 2 stages.
  assert shard("pp2_tp2_dp2/v2", "moe_layers/block_0/attention/key_up/w") == [1, 16, 2, 8]
  assert shard("pp2_tp2_dp2/v2", "moe_layers/block_0/attention/query_up/w") == [1, 12, 2, 12]
  # The real mechanisms run: all-to-all for experts, neighbour permutes for stages.
  collectives = {case: r["collectives"] for case, r in out.items()}
  assert collectives["dp2_ep4/moe"]["all-to-all"] > 0
  assert collectives["dp2_tp4_accum2/dense"]["all-to-all"] == 0
  assert collectives["pp2_tp2_dp2/v2"]["collective-permute"] > 0
  assert collectives["fsdp2_ep4/v2"]["all-to-all"] > 0
  v2 = out["fsdp2_ep4/v2"]["shards"]
  assert v2["moe_layers/block_0/attention/key_up/w"] == [2, 8, 4, 8]  # c over fsdp
  assert v2["moe_layers/block_0/attention/kv_down/w"] == [2, 16, 16]  # D over fsdp
  assert v2["moe_layers/block_0/moe/w_in"] == [2, 2, 16, 2, 16]  # E over 4, D over 2
  for case in ("fsdp8/dsa", "dp2_tp4_accum2/dense", "dp2_ep4/moe"):
    assert collectives[case]["collective-permute"] == 0, case


@pytest.mark.slow
def test_every_layout_with_every_model_matches_single_device():
  assert_matches_single_device(run_check(json.dumps(ALL_CASES)))


def test_checkpoint_saved_under_one_mesh_restores_under_another():
  out = run_check("--checkpoint", "dense_l4", json.dumps(["single", "dp2_tp4", "pp4_dp2"]))
  for layout, r in out.items():
    assert r["max_abs_diff"] == 0.0, layout
    assert r["data_state"] == {"position": 7}, layout
  assert out["single"]["devices"] == 1
  assert out["dp2_tp4"]["query_shard"] == [4, 32, 1, 8]
  assert out["pp4_dp2"]["query_shard"] == [1, 32, 4, 8]  # 4 layers over 4 stages.


@pytest.mark.parametrize("model,layouts", [
    ("dense", ["pp2_tp2_dp2"]),  # 3 layers on 2 stages: the pipeline pads one slot.
    pytest.param("dsa", ["pp2_tp2_dp2", "pp4_dp2", "dp2_tp4"], marks=pytest.mark.slow),
    pytest.param("moe", ["pp2_tp2_dp2", "dp2_ep4"], marks=pytest.mark.slow),
    # MLA's absorbed latent cache carried through the pipeline and split by tensor.
    pytest.param("v2", ["pp2_tp2_dp2", "dp2_tp4", "pp4_dp2"], marks=pytest.mark.slow),
])
def test_generation_under_tensor_and_pipeline_parallelism_matches_one_device(model, layouts):
  out = run_check("--generate", model, json.dumps(layouts))
  for layout, r in out.items():
    assert r["equal"], (layout, r["tokens"], r["ref_tokens"])
    if "pp" in layout:
      assert r["collectives"]["collective-permute"] > 0, layout  # Pipelined, not gathered.
