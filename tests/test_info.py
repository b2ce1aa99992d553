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


def published(name: str, arg: str | None = None):
  c = config_lib.from_file(REPO / "configs" / f"{name}.py", arg)
  config_lib.validate(c)
  return c, info.model_info(c)


def test_deepseek_v2_configs_count_the_published_totals():
  """236B / 21B and 15.7B / 2.4B (DeepSeek-V2 paper, Lite model card). Active counts the
  parameters a token multiplies by (the embedding lookup excluded: 'matmul parameters').
  Lite's comes to 2.45B, +2.1% over the published 2.4B, which must be rounded down (its
  15.7B total is exact to 0.04%, so the layout is the published one)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("v2", REPO / "configs" / "deepseek_v2.py")
  v2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(v2)
  for name, variant, active_tol in (("deepseek_v2", "full", 0.01),
                                    ("deepseek_v2_lite", "lite", 0.025)):
    c, report = published(name)
    total, active = v2.PUBLISHED_PARAMS[variant]
    assert abs(report["total_params"] / total - 1) < 0.01, (name, report["total_params"])
    assert abs(report["matmul_params"] / active - 1) < active_tol, (name, report["matmul_params"])
    # The matmul count agrees with the shapes: active = matmul + embedding lookup + norms.
    norms = sum(v for k, v in report["breakdown"].items() if k.endswith("norm"))
    norms += 60 * (1536 + 512) if variant == "full" else 27 * 512  # MLA's latent norms.
    assert report["active_params"] == (report["matmul_params"] + report["breakdown"]["embedder"]
                                       + norms)


def test_tiny_deepseek_v2_matches_the_tiny_article_moe_in_active_parameters():
  _, article = published("tiny", "moe=8x2")
  for name in ("deepseek_v2", "deepseek_v2_lite"):
    _, ours = published(name, "tiny")
    assert abs(ours["active_params"] / article["active_params"] - 1) < 0.015, name
