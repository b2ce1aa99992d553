"""The latency model (dsv2_jax/latency.py) against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from dsv2_jax import config as config_lib, latency

TOY = latency.Hardware("toy", peak_flops=1e12, hbm_bytes_per_s=1e11,
                       intra_node_bytes_per_s=1e10, inter_node_bytes_per_s=1e9,
                       devices_per_node=8, link_latency_s=1e-6)


def toy_model():
  m = config_lib.default_config().model
  m.update(d_model=64, num_layers=4, num_heads=4, ffn_hidden=256, vocab_size=100,
           activation="swiglu")
  return m


def test_ring_all_reduce_and_send():
  assert latency.ring_all_reduce_s(1e6, 8, 1e9, 0.0) == pytest.approx(2 * 7 / 8 * 1e-3)
  assert latency.ring_all_reduce_s(1e6, 4, 1e9, 1e-6) == pytest.approx(1.5e-3 + 6e-6)
  assert latency.ring_all_reduce_s(1e6, 1, 1e9, 1e-6) == 0.0
  assert latency.send_s(1e6, 1e9, 1e-6) == pytest.approx(1e-3 + 1e-6)


def test_decode_step_by_hand():
  """TP 2 x PP 2, one token after 99 cached ones, 2-byte weights. Per layer: attention
  4 x 64 x 64 = 16,384 and SwiGLU 3 x 64 x 256 = 49,152 parameters; the head 6,400.
  FLOPs per token 2 x (4 x 65,536 + 6,400) + 4 x 4 layers x 100 x 4 heads x 16 = 639,488."""
  layer_flops = (639_488 - 2 * 6_400) / 4
  compute = layer_flops / 2 / 1e12
  memory = ((16_384 + 49_152) * 2 + 2 * 100 * 4 * 16 * 2) / 2 / 1e11  # weights + K, V.
  tp_comm = 2 * (2 * (1 / 2) * (64 * 2) / 1e10 + 2 * 1e-6)
  head = max(2 * 6_400 / 2 / 1e12, 6_400 * 2 / 2 / 1e11) + (1 / 2 * 100 * 2 / 1e10 + 1e-6)
  p2p = 64 * 2 / 1e9 + 1e-6
  r = latency.estimate(toy_model(), TOY, latency.Layout(2, 2), tokens=1, context=99)
  assert r["per_layer"]["compute_s"] == pytest.approx(compute)
  assert r["per_layer"]["memory_s"] == pytest.approx(memory)
  assert r["per_layer"]["bound"] == "memory"
  assert r["total_s"] == pytest.approx(4 * (memory + tp_comm) + p2p + head)
  overlapped = latency.estimate(toy_model(), TOY, latency.Layout(2, 2, 4, True), 1, 99)
  # Decode is never chunked; the all-reduces hide behind (here: dominate) each layer.
  assert overlapped["total_s"] == pytest.approx(2 * max(2 * max(memory, tp_comm), p2p) + head)


def test_prefill_pipelines_chunks_through_the_stages():
  """Compute-bound, free links: m chunks through PP stages take (m + PP - 1) chunk-stage
  times, against PP x m without overlap."""
  free = latency.Hardware("free links", 1e12, 1e18, math.inf, math.inf, 8, 0.0)
  model = toy_model()
  one = latency.estimate(model, free, latency.Layout(1, 4, 1, False), tokens=512)
  piped = latency.estimate(model, free, latency.Layout(1, 4, 8, True), tokens=512)
  head = one["head_s"]
  body = one["total_s"] - head
  assert piped["total_s"] == pytest.approx((8 + 3) / (8 * 4) * body + head)
  serial = latency.estimate(model, free, latency.Layout(1, 4, 8, False), tokens=512)
  assert serial["total_s"] == pytest.approx(one["total_s"])


def test_bad_layouts():
  with pytest.raises(ValueError, match="more than the 8 devices"):
    latency.estimate(toy_model(), TOY, latency.Layout(16, 1), 1)
  with pytest.raises(ValueError, match="do not split into 3 microbatches"):
    latency.estimate(toy_model(), TOY, latency.Layout(1, 2, 3, True), 512)
  with pytest.raises(ValueError, match=r"stages=5 must be in \[1, 4 layers\]"):
    latency.estimate(toy_model(), TOY, latency.Layout(1, 5), 1)


def test_article_table_for_the_paper_config():
  config = config_lib.from_file("configs/paper_175b.py")
  table = latency.article_table(config.model, latency.PRESETS["h100"], 2048, 128)
  rows = table["layouts"]
  assert set(rows) == {"tp8", "tp8_pp4", "tp8_pp4_overlap"}
  assert rows["tp8"]["speedup_vs_tp8"] == 1.0
  # Without overlap, pipeline stages only add sends to one request's latency.
  assert rows["tp8_pp4"]["request_s"] > rows["tp8"]["request_s"]
  assert rows["tp8_pp4_overlap"]["request_s"] < rows["tp8"]["request_s"]
  assert "tp8_pp4_overlap" in latency.format_table(table)


def test_tp_collective_bytes_match_the_compiled_decode_step():
  """docs/figures/parallel_inference.json, layout tp4_dp2: one compiled decode step of
  configs/tiny.py (4 layers, D 128, vocabulary 258, f32) for 4 rows per data shard
  moved 8 all-reduces of 16,384 bytes in all and one 4,160-byte all-gather per device
  (read from the HLO by parallel/collectives.py)."""
  model = config_lib.from_file("configs/tiny.py").model
  got = latency.tp_collective_bytes(model, tokens=4, tensor=4, bytes_per_value=4)
  assert got == {"all-reduce": 16_384, "all-gather": 4_160}


@pytest.mark.slow  # An experiment's smoke run, like the other experiments' (23 s).
def test_latency_check_quick_runs(tmp_path):
  """experiments/latency_check.py --quick: measured and predicted side by side."""
  import json, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.helpers import REPO  # pylint: disable=g-import-not-at-top
  out = tmp_path / "lc.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.latency_check", "--quick",
                         "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["phase"] for r in rows] == ["prefill", "decode", "decode_scanned"]
  # A smoke test: the timings are figures, not assertions. Decode is a difference of two
  # timed calls (16 and 8 new tokens under --quick), which other work on the cores can
  # push below zero; it must be a number, the prediction positive.
  assert all(math.isfinite(r["measured_s"]) and r["predicted_s"] > 0 for r in rows)
