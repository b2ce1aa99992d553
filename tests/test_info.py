"""Parameter accounting from abstract shapes: dense, MoE, and the paper-scale config."""

from __future__ import annotations

from dsv2_jax import config as config_lib
from dsv2_jax import info
from tests.helpers import REPO, small_config


def small(**moe):
  return small_config(d_model=16, num_layers=4, num_heads=2, ffn_hidden=32, max_seq_len=32,
                      moe=moe)


def test_dense_model_is_fully_active():
  report = info.model_info(small())
  assert report["active_params"] == report["total_params"] == sum(report["breakdown"].values())
  assert report["routed_expert_params"] == 0


def test_moe_active_counts_k_of_e_routed_experts_by_hand():
  e, k, f, d, gh, layers = 8, 2, 12, 16, 8, 2  # every_n_layers=2: 2 MoE of 4 layers.
  report = info.model_info(small(num_experts=e, top_k=k, expert_hidden=f, gate_hidden=gh,
                                 every_n_layers=2, num_shared_experts=1))
  routed = layers * e * 3 * d * f  # SwiGLU: gate, up, down.
  assert report["routed_expert_params"] == routed
  assert report["total_params"] - report["active_params"] == routed - routed * k // e
  assert report["breakdown"]["moe/router"] == layers * (d * gh + gh * e)
  assert report["breakdown"]["moe/shared_experts"] == layers * 3 * d * f


def test_paper_config_is_175b_total_and_35b_active_within_one_percent():
  c = config_lib.from_file(REPO / "configs" / "paper_175b.py")
  config_lib.validate(c)
  report = info.model_info(c)
  assert c.model.moe.num_experts == 128 and c.model.moe.top_k == 4
  assert abs(report["total_params"] / 175e9 - 1) < 0.01, report["total_params"]
  assert abs(report["active_params"] / 35e9 - 1) < 0.01, report["active_params"]
