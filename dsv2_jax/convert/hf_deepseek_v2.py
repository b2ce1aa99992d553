"""Hugging Face `DeepseekV2ForCausalLM` -> our config and parameters.

  python -m dsv2_jax convert --from_hf DIR --workdir OUT

DIR holds a transformers checkpoint: `config.json` and the weights as `*.safetensors`
(sharded or not) or `pytorch_model*.bin`. OUT becomes a workdir like a trained run's
(config.json, checkpoints/ with a step-0 train state: the converted parameters and zero
optimizer moments), so `eval`, `generate`, `info` and `train --init_from OUT` read it.

The mapping (per layer i, HF names under `model.layers.{i}.`):
  self_attn.q_proj [N(H+r), D]          -> attention/query [D, N, H+r]
  self_attn.q_a_proj / q_b_proj         -> attention/query_down [D, q] / query_up [q, N, H+r]
  self_attn.kv_a_proj_with_mqa [c+r, D] -> attention/kv_down [D, c] and key_rope [D, r]
  self_attn.kv_b_proj [N(H+O), c]       -> attention/key_up [c, N, H] and value_up [c, N, O]
  self_attn.o_proj [D, N O]             -> attention/out [N, O, D]
  *_layernorm                           -> attention_norm, ffn_norm, query_norm, kv_norm
  mlp.{gate,up,down}_proj               -> ffn/{gate,up,down} (dense layers)
  mlp.gate [E, D]                       -> moe/router/gate [D, E]
  mlp.experts.gate_up_proj [E, 2F, D]   -> moe/w_in [E, D, 2, F]  (per-expert
  mlp.experts.down_proj [E, D, F]       -> moe/w_out [E, F, D]     `experts.j.*` too)
  mlp.shared_experts.*                  -> moe/shared_experts/*
HF rotates interleaved pairs (x[2i], x[2i+1]) of the RoPE part; our `apply_rope` rotates
(x[i], x[i + r/2]). The converter permutes the RoPE rows of the query and key_rope
projections, which changes no dot product (q and k are permuted alike).

`model_config` maps the HF config (`config.json` of the published checkpoints included,
whose `rope_scaling` is YaRN with DeepSeek's mscale constants) to our `model` fields;
configs/deepseek_v2*.py are built from it, so the configs and the converter agree.
Everything is read with numpy (safetensors' numpy API or torch for `.bin` files); torch
and transformers are needed only by the parity test (tests/convert/).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from dsv2_jax import config as config_lib


class ConvertError(ValueError):
  """The HF checkpoint cannot be converted (missing files, unsupported options)."""


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The RoPE settings of an HF config, old ('rope_theta' + 'rope_scaling') or new
  ('rope_parameters') style."""
  params = dict(hf.get("rope_parameters") or {})
  params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  scaling = hf.get("rope_scaling") or {}
  for key, value in scaling.items():
    params.setdefault("rope_type" if key == "type" else key, value)
  params.setdefault("rope_type", "default")
  return params


def model_config(hf: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our full config for the HF DeepSeek-V2 config dict `hf` (config.json's fields).

  Raises ConvertError for options we do not implement (biases, other activations or
  routing methods).
  """
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ConvertError("attention_bias / mlp_bias are not supported (DeepSeek-V2 has none).")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConvertError(f"hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported.")
  if hf.get("scoring_func", "softmax") != "softmax":
    raise ConvertError(f"scoring_func={hf['scoring_func']!r}: only 'softmax' is supported.")
  c = config_lib.default_config()
  m = c.model
  m.update(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
           num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
           ffn_hidden=hf["intermediate_size"], activation="swiglu", norm="rmsnorm",
           norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope",
           max_seq_len=int(hf.get("max_position_embeddings", 2048)),
           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
           init_std=float(hf.get("initializer_range", 0.02)))
  m.mla.update(kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank") or 0,
               qk_nope_head_dim=hf["qk_nope_head_dim"],
               qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
  rope = _rope_parameters(hf)
  m.rope_max_wavelength = float(rope["rope_theta"])
  if rope["rope_type"] == "yarn":
    if rope.get("factor") is None or rope.get("truncate", True) is False:
      raise ConvertError("yarn needs its factor, and only the truncated (rounded) ramp is "
                         "supported (rope truncate: true).")
    if bool(rope.get("mscale")) != bool(rope.get("mscale_all_dim")):
      raise ConvertError("yarn with only one of mscale / mscale_all_dim is not supported "
                         "(transformers then ignores the other): give both or neither.")
    m.update(rope_scaling="yarn", rope_scale=float(rope["factor"]),
             rope_original_length=int(rope["original_max_position_embeddings"]),
             yarn_beta_fast=float(rope.get("beta_fast") or 32),
             yarn_beta_slow=float(rope.get("beta_slow") or 1), yarn_ramp="dims",
             yarn_mscale=float(rope.get("mscale") or 1.0),
             yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))
    if rope.get("attention_factor") is not None:
      raise ConvertError("rope attention_factor overrides are not supported.")
  elif rope["rope_type"] != "default":
    raise ConvertError(f"rope type {rope['rope_type']!r}: only default and yarn are supported.")
  experts = hf.get("n_routed_experts") or 0
  if experts and hf.get("moe_layer_freq", 1) != 1:
    raise ConvertError(f"moe_layer_freq={hf['moe_layer_freq']}: only 1 (every layer after "
                       "first_k_dense_replace is MoE, as in every published checkpoint).")
  if experts and hf.get("norm_topk_prob"):
    raise ConvertError("norm_topk_prob=true: DeepSeek's code then renormalises instead of "
                       "scaling, transformers scales anyway; not converted (the published "
                       "checkpoints use false).")
  if experts:
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
      raise ConvertError(f"topk_method={method!r}: greedy or group_limited_greedy only.")
    grouped = method == "group_limited_greedy"
    m.moe.update(num_experts=experts, top_k=hf["num_experts_per_tok"], router="linear",
                 expert_hidden=hf["moe_intermediate_size"],
                 num_shared_experts=hf.get("n_shared_experts") or 0,
                 first_dense_layers=hf.get("first_k_dense_replace", 0),
                 routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                 n_group=hf["n_group"] if grouped else 1,
                 topk_group=hf["topk_group"] if grouped else 1,
                 aux_loss_weight=float(hf.get("aux_loss_alpha", 0.001)), z_loss_weight=0.0)
  return c


def _interleaved_to_halves(r: int) -> np.ndarray:
  """Index order that turns interleaved RoPE pairs (2i, 2i+1) into halves (i, i + r/2)."""
  return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


class _Weights:
  """Lazy access to an HF state dict as float32 numpy arrays; reports what is missing."""

  def __init__(self, get: Callable[[str], np.ndarray], keys: set[str]):
    self._get, self.keys, self.used = get, keys, set()

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.keys:
      raise ConvertError(f"the HF checkpoint has no tensor {name!r}.")
    self.used.add(name)
    return np.asarray(self._get(name), np.float32)

  def __contains__(self, name: str) -> bool:
    return name in self.keys


def _attention(w: _Weights, p: str, m: ml_collections.ConfigDict) -> dict[str, Any]:
  n, mla = m.num_heads, m.mla
  nope, r, vdim, c = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
  head_order = np.concatenate([np.arange(nope), nope + _interleaved_to_halves(r)])

  def query(weight: np.ndarray) -> np.ndarray:  # [N (H + r), IN] -> [IN, N, H + r]
    return weight.T.reshape(-1, n, nope + r)[..., head_order]

  out = {}
  if mla.q_lora_rank:
    out["query_down"] = {"w": w(p + "q_a_proj.weight").T}
    out["query_norm"] = {"scale": w(p + "q_a_layernorm.weight")}
    out["query_up"] = {"w": query(w(p + "q_b_proj.weight"))}
  else:
    out["query"] = {"w": query(w(p + "q_proj.weight"))}
  kv_a = w(p + "kv_a_proj_with_mqa.weight")  # [c + r, D]
  out["kv_down"] = {"w": kv_a[:c].T}
  out["key_rope"] = {"w": kv_a[c:][_interleaved_to_halves(r)].T}
  out["kv_norm"] = {"scale": w(p + "kv_a_layernorm.weight")}
  kv_b = w(p + "kv_b_proj.weight").reshape(n, nope + vdim, c)
  out["key_up"] = {"w": kv_b[:, :nope].transpose(2, 0, 1)}
  out["value_up"] = {"w": kv_b[:, nope:].transpose(2, 0, 1)}
  out["out"] = {"w": w(p + "o_proj.weight").T.reshape(n, vdim, -1)}
  return out


def _mlp(w: _Weights, p: str) -> dict[str, Any]:
  return {name: {"w": w(f"{p}{name}_proj.weight").T} for name in ("gate", "up", "down")}


def _moe(w: _Weights, p: str, m: ml_collections.ConfigDict) -> dict[str, Any]:
  e, f = m.moe.num_experts, m.moe.expert_hidden
  if p + "experts.gate_up_proj" in w:  # transformers >= 5: experts fused [E, ...].
    gate_up = w(p + "experts.gate_up_proj")  # [E, 2F, D]: gate rows, then up rows
    down = w(p + "experts.down_proj")  # [E, D, F]
  else:  # The published checkpoints: experts.{j}.{gate,up,down}_proj.weight.
    gate_up = np.stack([np.concatenate([w(f"{p}experts.{j}.gate_proj.weight"),
                                        w(f"{p}experts.{j}.up_proj.weight")]) for j in range(e)])
    down = np.stack([w(f"{p}experts.{j}.down_proj.weight") for j in range(e)])
  out = {"router": {"gate": w(p + "gate.weight").T},
         "w_in": gate_up.reshape(e, 2, f, -1).transpose(0, 3, 1, 2),
         "w_out": down.transpose(0, 2, 1)}
  if m.moe.num_shared_experts:
    out["shared_experts"] = _mlp(w, p + "shared_experts.")
  return out


def _layer(w: _Weights, i: int, m: ml_collections.ConfigDict, moe: bool) -> dict[str, Any]:
  p = f"model.layers.{i}."
  out = {"attention": _attention(w, p + "self_attn.", m),
         "attention_norm": {"scale": w(p + "input_layernorm.weight")},
         "ffn_norm": {"scale": w(p + "post_attention_layernorm.weight")}}
  if moe:
    out["moe"] = _moe(w, p + "mlp.", m)
  else:
    out["ffn"] = _mlp(w, p + "mlp.")
  return out


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def convert_params(get: Callable[[str], np.ndarray], keys: set[str],
                   config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Our parameter tree (numpy f32) from HF tensors `get(name)` over names `keys`.

  Raises ConvertError naming a missing tensor, or listing tensors nothing read.
  """
  # pylint: disable=g-import-not-at-top
  from dsv2_jax.model.transformer import BlockGroup, layer_plan
  m = config.model
  w = _Weights(get, keys)
  params: dict[str, Any] = {"embedder": {"embedding": w("model.embed_tokens.weight")},
                            "final_norm": {"scale": w("model.norm.weight")}}
  if not m.tie_embeddings:
    params["head"] = {"w": w("lm_head.weight").T}
  first = 0
  for name, unit, repeats in layer_plan(m):
    if unit is BlockGroup:
      n = m.moe.every_n_layers
      groups = [{f"block_{j}": _layer(w, first + g * n + j, m, moe=j == n - 1)
                 for j in range(n)} for g in range(repeats)]
      first += repeats * n
    else:
      groups = [_layer(w, first + g, m, moe=False) for g in range(repeats)]
      first += repeats
    params[name] = _stack(groups)
  ignored = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if m.tie_embeddings else ())
  unused = sorted(k for k in keys - w.used if not k.endswith(ignored))
  if unused:
    raise ConvertError(f"{len(unused)} HF tensors have no place in the converted model, "
                       f"e.g. {unused[:3]}: is this a DeepseekV2ForCausalLM checkpoint?")
  return params


def read_checkpoint(directory: str | pathlib.Path
                    ) -> tuple[dict[str, Any], Callable[[str], np.ndarray], set[str]]:
  """(config.json dict, tensor getter, tensor names) of an HF checkpoint directory."""
  directory = pathlib.Path(directory).expanduser()
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise ConvertError(f"--from_hf {directory}: no config.json there; point it at a "
                       "transformers checkpoint directory (save_pretrained output).")
  hf = json.loads(config_path.read_text())
  if hf.get("model_type", "deepseek_v2") != "deepseek_v2":
    raise ConvertError(f"--from_hf {directory} holds model_type={hf['model_type']!r}; only "
                       "deepseek_v2 (DeepseekV2ForCausalLM) converts.")
  files = sorted(directory.glob("*.safetensors"))
  if files:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    handles = [safe_open(str(f), framework="numpy") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    return hf, lambda name: where[name].get_tensor(name), set(where)
  files = sorted(directory.glob("pytorch_model*.bin"))
  if not files:
    raise ConvertError(f"--from_hf {directory}: no *.safetensors or pytorch_model*.bin "
                       "weights found.")
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for f in files:
    state.update(torch.load(f, map_location="cpu", weights_only=True))
  return hf, lambda name: state[name].float().numpy(), set(state)


def convert(from_hf: str | pathlib.Path, workdir: str | pathlib.Path,
            seq_len: int = 0) -> dict[str, Any]:
  """Writes workdir (config.json + a step-0 checkpoint) from the HF checkpoint `from_hf`.

  seq_len: data.seq_len of the written config (0: min(2,048, max_position_embeddings)).
  Returns a summary (parameter count, the converted config's model section).
  """
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  from dsv2_jax.train import trainer
  from dsv2_jax.train.checkpoint import Checkpointer
  from dsv2_jax.train.state import TrainState, abstract_state
  hf, get, keys = read_checkpoint(from_hf)
  config = model_config(hf)
  config.data.seq_len = seq_len or min(2048, config.model.max_seq_len)
  config_lib.validate(config)
  workdir = pathlib.Path(workdir).expanduser().resolve()
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    raise ConvertError(f"--workdir {workdir} already holds checkpoints; choose a new one.")
  params = convert_params(get, keys, config)
  run = trainer.Run(config, workdir)
  boxed = abstract_state(run.model, run.tx, config.data.seq_len)
  expected = nn.meta.unbox(boxed.params)
  got_shapes = jax.tree.map(lambda a: a.shape, params)
  want_shapes = jax.tree.map(lambda a: a.shape, expected)
  if got_shapes != want_shapes:
    raise ConvertError(f"converted shapes differ from the config's model: {got_shapes} vs "
                       f"{want_shapes}")
  from dsv2_jax.parallel import sharding
  shardings = sharding.logical_shardings(boxed, run.mesh)
  placed = jax.tree.map(lambda a, like, s: jax.device_put(a.astype(like.dtype), s), params,
                        expected, shardings.params)
  zero = np.zeros((), np.int32)
  state = TrainState(step=zero, params=placed, opt_state=run.tx.init(placed),
                     rng=jax.random.PRNGKey(config.seed), skipped_steps=zero,
                     consecutive_skips=zero)
  trainer.prepare_workdir(workdir)
  (workdir / "config.json").write_text(config_lib.to_json(config))
  checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=1, use_async=False)
  try:
    checkpointer.save(0, state, None)
  finally:
    checkpointer.close()
  total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  summary = {"from_hf": str(pathlib.Path(from_hf).expanduser().resolve()),
             "workdir": str(workdir), "parameters": total,
             "model": config.model.to_dict()}
  (workdir / "converted.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
  return summary
