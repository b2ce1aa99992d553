"""Logit parity with Hugging Face transformers' DeepseekV2ForCausalLM.

A tiny random HF model is built locally with torch (no hub), saved with
`save_pretrained` (safetensors), converted, and its logits compared with ours in f32:
a full forward, and cached decoding token by token (ours: the absorbed latent cache),
with and without low-rank queries and group-limited routing. Skipped when torch or
transformers are absent (`pip install -e '.[test]'` installs both).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity test builds the HF model with torch")
transformers = pytest.importorskip(
    "transformers", reason="the parity test needs transformers' DeepseekV2ForCausalLM")

from dsv2_jax import config as config_lib  # noqa: E402
from dsv2_jax.convert import hf_deepseek_v2  # noqa: E402
from dsv2_jax.model.transformer import build_model  # noqa: E402
from tests.helpers import cli  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=12, q_lora_rank=None,
            qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            routed_scaling_factor=2.0, max_position_embeddings=64, rms_norm_eps=1e-6,
            tie_word_embeddings=False, topk_method="greedy", n_group=1, topk_group=1)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
CASES = {
    "lite": dict(),  # DeepSeek-V2-Lite's shape: full-rank queries, greedy top-k.
    "q_lora_group_limited_yarn": dict(  # DeepSeek-V2's: q LoRA, 4 groups pick 2, YaRN.
        q_lora_rank=10, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        rope_parameters=YARN),
}


def hf_model(tmp_path, **fields):
  """A random tiny DeepseekV2ForCausalLM saved under tmp_path/hf, with weights large
  enough (std ~ 1/sqrt(fan-in), norms around 1) that logits differ by O(1)."""
  torch.manual_seed(0)
  config = transformers.DeepseekV2Config(**{**BASE, **fields})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.DeepseekV2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 1.0 / np.sqrt(p.shape[-1]))
  model.save_pretrained(tmp_path / "hf")
  return model


def ours(tmp_path):
  hf, get, keys = hf_deepseek_v2.read_checkpoint(tmp_path / "hf")
  config = hf_deepseek_v2.model_config(hf)
  config.data.seq_len = 32
  config_lib.validate(config)
  params = hf_deepseek_v2.convert_params(get, keys, config)
  return build_model(config.model), jax.tree.map(jnp.asarray, params)


def tokens(t=20, b=2):
  return np.random.RandomState(1).randint(0, 300, (b, t))


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def hf_cached_logits(model, ids, first):
  with torch.no_grad():
    out = model(torch.tensor(ids[:, :first]), use_cache=True)
    logits, cache = [out.logits.numpy()], out.past_key_values
    for i in range(first, ids.shape[1]):
      out = model(torch.tensor(ids[:, i:i + 1]), past_key_values=cache, use_cache=True)
      logits.append(out.logits.numpy())
      cache = out.past_key_values
  return np.concatenate(logits, axis=1)


def our_cached_logits(model, params, ids, first):
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((ids.shape[0], ids.shape[1]), jnp.int32),
                     decode=True)["cache"]
  cache = jax.tree.map(jnp.zeros_like, cache)
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True,
                                          mutable=["cache"]))
  logits, mutated = step(cache, ids[:, :first])
  outs = [np.asarray(logits)]
  for i in range(first, ids.shape[1]):
    logits, mutated = step(mutated["cache"], ids[:, i:i + 1])
    outs.append(np.asarray(logits))
  return np.concatenate(outs, axis=1)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("fields", CASES.values(), ids=CASES.keys())
def test_full_forward_and_cached_decode_match_transformers(tmp_path, fields):
  hf = hf_model(tmp_path, **fields)
  model, params = ours(tmp_path)
  ids = tokens()
  want = hf_logits(hf, ids)
  assert want.std() > 0.5  # Logits far from uniform: the comparison is sharp.
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  decoded = our_cached_logits(model, params, jnp.asarray(ids), first=9)
  np.testing.assert_allclose(decoded, want, atol=TOL, rtol=0)
  np.testing.assert_allclose(decoded, hf_cached_logits(hf, ids, first=9), atol=TOL, rtol=0)


def test_without_the_rope_permutation_logits_differ(tmp_path, monkeypatch):
  """The interleaved -> halves permutation matters: leaving it out breaks parity."""
  hf = hf_model(tmp_path)
  monkeypatch.setattr(hf_deepseek_v2, "_interleaved_to_halves", np.arange)
  model, params = ours(tmp_path)
  ids = tokens()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(got - hf_logits(hf, ids)).max() > 1e-2


def test_the_convert_command_writes_a_workdir_that_eval_and_info_read(tmp_path):
  """`python -m dsv2_jax convert` writes a workdir whose restored parameters give HF's
  logits; `info` reads it; bad input exits 2; a second conversion into it is refused."""
  from dsv2_jax.train import trainer  # pylint: disable=g-import-not-at-top
  hf = hf_model(tmp_path, q_lora_rank=10)
  count = sum(p.numel() for p in hf.parameters())
  run_dir = str(tmp_path / "run")
  out = cli("convert", "--from_hf", str(tmp_path / "hf"), "--workdir", run_dir, "--json")
  assert json.loads(out.stdout)["parameters"] == count
  assert json.loads(cli("info", "--workdir", run_dir, "--json").stdout)["total_params"] == count
  run = trainer.Run(trainer.load_config(run_dir), run_dir)
  params, _, step = run.trained_params()
  assert step == 0
  ids = tokens()
  got = np.asarray(jax.jit(run.model.apply)({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(got, hf_logits(hf, ids), atol=TOL, rtol=0)
  bad = cli("convert", "--from_hf", str(tmp_path), "--workdir", str(tmp_path / "x"),
            check=False)
  assert bad.returncode == 2 and "no config.json" in bad.stderr  # One line, no traceback.
  with pytest.raises(hf_deepseek_v2.ConvertError, match="already holds checkpoints"):
    hf_deepseek_v2.convert(tmp_path / "hf", run_dir)


def test_bad_checkpoints_are_named(tmp_path):
  with pytest.raises(hf_deepseek_v2.ConvertError, match="no config.json"):
    hf_deepseek_v2.read_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(hf_deepseek_v2.ConvertError, match="only deepseek_v2"):
    hf_deepseek_v2.read_checkpoint(tmp_path)
  for fields, message in [
      (dict(hidden_act="gelu"), "hidden_act"),
      (dict(moe_layer_freq=2), "moe_layer_freq=2"),
      (dict(norm_topk_prob=True), "norm_topk_prob=true"),
      (dict(rope_parameters={**YARN, "mscale_all_dim": 0}), "only one of mscale"),
  ]:
    with pytest.raises(hf_deepseek_v2.ConvertError, match=message):
      hf_deepseek_v2.model_config({**BASE, **fields})

