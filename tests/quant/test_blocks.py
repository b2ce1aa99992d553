"""INT8 blocks (dsv2_jax/quant/blocks.py) against a direct NumPy formula.

Oracle: for each [K, N] matrix of a weight, blocks of (bk, bn) padded with zeros, one
scale s = max|w| / 127 per block, q = round(w / s) (half to even), w' = q s. Also: the
matrix view of every weight of a dense and a GMoE model contracts exactly what its
einsum contracts, the straight-through gradient, and the rounding penalty.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.quant import blocks
from tests import helpers


def numpy_blocks(m: np.ndarray, bk: int, bn: int) -> tuple[np.ndarray, np.ndarray]:
  """(q, scale [Kb, Nb]) of one [K, N] matrix, straight from the formula."""
  k, n = m.shape
  kb, nb = math.ceil(k / bk), math.ceil(n / bn)
  padded = np.zeros((kb * bk, nb * bn), np.float64)
  padded[:k, :n] = m
  tiles = padded.reshape(kb, bk, nb, bn)
  scale = np.abs(tiles).max(axis=(1, 3)) / 127.0
  scale = np.where(scale > 0, scale, 1.0)
  q = np.round(tiles / scale[:, None, :, None]).reshape(kb * bk, nb * bn)[:k, :n]
  return q, scale


@pytest.mark.parametrize("shape,names,layout", [
    ((12, 20), ("embed", "mlp"), "4x4"),
    ((10, 6), ("embed", "mlp"), "4x4"),  # Blocks do not divide either axis.
    ((3, 9, 7), ("layers", "mlp", "embed"), "4x4"),
    ((3, 9, 7), ("layers", "mlp", "embed"), "channel"),
    ((3, 9, 7), ("layers", "mlp", "embed"), "tensor"),
    ((2, 3, 8, 2, 5), ("layers", "expert", "embed", None, "expert_mlp"), "2x3"),
])
def test_round_trip_matches_the_formula(shape, names, layout):
  w = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
  t = blocks.quantize(jnp.asarray(w), names, blocks.Layout.parse(layout))
  stack, contract, output = blocks.matrix_axes(names)
  order = stack + contract + output
  mats = np.transpose(w, order).reshape(-1, math.prod(w.shape[a] for a in contract),
                                        math.prod(w.shape[a] for a in output))
  got_q = np.transpose(np.asarray(t.qvalue), order).reshape(mats.shape)
  got_w = np.transpose(np.asarray(blocks.dequantize(t)), order).reshape(mats.shape)
  scales = np.asarray(t.scale).reshape(len(mats), *t.scale.shape[-2:])
  lay = blocks.Layout.parse(layout)
  for i, m in enumerate(mats.astype(np.float64)):
    bk, bn = lay.block(*m.shape)
    q, scale = numpy_blocks(m, bk, bn)
    np.testing.assert_allclose(scales[i], scale, rtol=1e-6)
    # Integers equal except where w / s sits on a rounding tie within float error.
    ratio = m / np.repeat(np.repeat(scale, bk, 0), bn, 1)[:m.shape[0], :m.shape[1]]
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    np.testing.assert_array_equal(got_q[i][~tie], q[~tie])
    assert np.abs(got_q[i]).max() <= 127
    full = np.repeat(np.repeat(scale, bk, 0), bn, 1)[:m.shape[0], :m.shape[1]]
    np.testing.assert_allclose(got_w[i], got_q[i] * full, rtol=1e-6, atol=1e-9)
    assert np.all(np.abs(got_w[i] - m) <= full / 2 * (1 + 1e-5))  # Within half a step.
  assert t.qvalue.dtype == jnp.int8 and t.qvalue.shape == shape


def test_the_largest_weight_of_each_block_is_exact():
  w = jnp.asarray(np.random.RandomState(1).standard_normal((8, 8)), jnp.float32)
  back = blocks.dequantize(blocks.quantize(w, ("embed", "mlp"), blocks.Layout(4, 4)))
  tiles = np.asarray(w).reshape(2, 4, 2, 4)
  idx = np.abs(tiles).reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16).argmax(-1)
  got = np.asarray(back).reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)
  want = tiles.transpose(0, 2, 1, 3).reshape(4, 16)
  np.testing.assert_allclose(got[np.arange(4), idx], want[np.arange(4), idx], rtol=1e-6)


def test_zero_blocks_and_the_embedding_table():
  w = np.zeros((8, 6), np.float32)
  w[:4, :3] = np.random.RandomState(2).standard_normal((4, 3))
  t = blocks.quantize(jnp.asarray(w), ("embed", "mlp"), blocks.Layout(4, 3))
  assert np.isfinite(np.asarray(t.scale)).all()
  np.testing.assert_array_equal(np.asarray(blocks.dequantize(t))[4:], 0.0)
  # The table (vocab, embed) is contracted over embed: blocks run along embed per row.
  table = np.random.RandomState(3).standard_normal((6, 8)).astype(np.float32)
  t = blocks.quantize(jnp.asarray(table), ("vocab", "embed"), blocks.Layout.parse("channel"))
  assert t.scale.shape == (1, 6)  # One scale per vocabulary row (output channel).
  np.testing.assert_allclose(np.asarray(t.scale)[0], np.abs(table).max(1) / 127, rtol=1e-6)


def test_slicing_stack_axes_keeps_a_valid_tensor():
  w = jnp.asarray(np.random.RandomState(4).standard_normal((3, 8, 5)), jnp.float32)
  t = blocks.quantize(w, ("layers", "embed", "mlp"), blocks.Layout(4, 4))
  layer = jax.tree.map(lambda a: a[1], t)  # What nn.scan hands each layer.
  np.testing.assert_array_equal(np.asarray(blocks.dequantize(layer)),
                                np.asarray(blocks.dequantize(t))[1])


@pytest.mark.parametrize("text,want", [("4x4", (4, 4)), ("channel", (0, 1)),
                                       ("tensor", (0, 0)), ("1x32", (1, 32))])
def test_layout_parse(text, want):
  lay = blocks.Layout.parse(text)
  assert (lay.rows, lay.cols) == want and str(lay) == text


@pytest.mark.parametrize("text", ["0x4", "4x0", "4", "4x4x4", "-1x4", "block"])
def test_layout_parse_rejects(text):
  with pytest.raises(ValueError, match="is not a block shape"):
    blocks.Layout.parse(text)


@pytest.mark.parametrize("moe,mla", [({}, {}), (helpers.MOE, {}),
                                     (helpers.DEEPSEEK_MOE, dict(helpers.MLA, q_lora_rank=8))],
                         ids=["dense", "gmoe", "deepseek_v2"])
def test_matrix_view_contracts_what_each_einsum_contracts(moe, mla):
  """Each weight's contracted axes are those its einsum contracts (fan-in as written in
  the model: 'XD,DNH', 'XNH,NHD', 'XD,VD' for the tied head, 'Xc,cNH' for MLA, ...)."""
  cfg = helpers.small_model_config(moe=moe, mla=mla, tie_embeddings=False)
  boxed = jax.eval_shape(lambda: helpers.build_model(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  fan_in = {"query": 1, "key": 1, "value": 1, "out": 2, "up": 1, "gate": 1, "down": 1,
            "gate_in": 1, "gate_out": 1, "w_in": 1, "w_out": 1, "head": 1, "embedding": 1,
            "query_down": 1, "query_up": 1, "kv_down": 1, "key_rope": 1, "key_up": 1,
            "value_up": 1}
  seen = set()
  for keys, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    names = tuple(leaf.names)
    if "norm" in names or names == ("expert",):
      continue  # Norm scales and the balance bias are not matrices.
    name = keys[-1].key if keys[-1].key not in ("w",) else keys[-2].key
    _, contract, _ = blocks.matrix_axes(names)
    assert len(contract) == fan_in[name], (name, names)
    want = {"query_up": "q_lora", "key_up": "kv_lora", "value_up": "kv_lora"}.get(name)
    if name in ("query", "key", "value", "up", "gate", "gate_in", "w_in", "head", "embedding",
                "query_down", "kv_down", "key_rope"):
      want = "embed"
    if want:
      assert [names[a] for a in contract] == [want], (name, names)
    seen.add(name)
  assert {"out", "head", "embedding"} <= seen and ("query" in seen) != bool(mla)
  assert ({"w_in", "w_out"} <= seen) == bool(moe)
  assert ("gate_out" in seen) == (moe.get("router", "mlp") == "mlp" and bool(moe))
  assert ({"query_down", "query_up", "kv_down", "key_rope", "key_up", "value_up"} <= seen
          ) == bool(mla)


def test_straight_through_gradient_and_penalty():
  w = jnp.asarray(np.random.RandomState(5).standard_normal((8, 12)), jnp.float32)
  names, lay = ("embed", "mlp"), blocks.Layout(4, 4)
  c = jnp.asarray(np.random.RandomState(6).standard_normal((8, 12)), jnp.float32)
  g = jax.grad(lambda w: jnp.sum(blocks.fake_quantize(w, names, lay) * c))(w)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(c))  # Identity backward.
  np.testing.assert_array_equal(np.asarray(blocks.fake_quantize(w, names, lay)),
                                np.asarray(blocks.round_trip(w, names, lay)))
  rounded = np.asarray(blocks.round_trip(w, names, lay), np.float64)
  value, grad = jax.value_and_grad(lambda w: blocks.rounding_error(w, names, lay))(w)
  np.testing.assert_allclose(float(value), np.sum((rounded - np.asarray(w)) ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), 2 * (np.asarray(w) - rounded), atol=1e-6)
