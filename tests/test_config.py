"""Config validation: each bad value gets a message naming the field and the fix."""

from __future__ import annotations

import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.train import trainer
from tests.helpers import REPO, tiny_config

BAD = [
    ("model.num_heads", 5, r"model.num_heads=5 does not divide model.d_model=32"),
    ("data.seq_len", 256, r"data.seq_len=256 is longer than the position limit model.max_seq_len=128"),
    ("train.steps", 0, r"train.steps=0 must be a positive integer"),
    ("data.batch_size", -2, r"data.batch_size=-2 must be a positive integer"),
    ("model.dtype", "float8", r"model.dtype='float8' is not supported; choose one of"),
    ("model.param_dtype", "fp32", r"model.param_dtype='fp32' is not supported"),
    ("model.num_kv_heads", 3, r"model.num_kv_heads=3 must divide model.num_heads=4"),
    ("data.dataset", "", r"data.dataset is empty"),
    ("data.dataset", "../etc", r"data.dataset='../etc' is not a dataset name"),
    ("model.remat_policy", "sometimes", r"model.remat_policy='sometimes' is not supported"),
    ("train.warmup_steps", 100, r"train.warmup_steps=100 must be in \[0, train.steps=6\]"),
    ("mesh.data", 0, r"mesh.data=0 must be a positive integer or -1"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_validation_names_the_field(tmp_path, field, value, message):
  c = tiny_config(str(tmp_path))
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_unknown_dataset_fails_at_start_up_naming_the_field(tmp_path):
  c = tiny_config(str(tmp_path))
  c.data.dataset = "no_such_corpus"
  from dsv2_jax.data.sources import DatasetUnavailableError
  with pytest.raises(DatasetUnavailableError, match=r"data.dataset='no_such_corpus'"):
    trainer.train_and_evaluate(c, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints" / "1").exists()


def test_vocab_smaller_than_tokenizer_is_rejected(tmp_path):
  c = tiny_config(str(tmp_path))
  c.model.vocab_size = 200
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size=200"):
    trainer.Run(c, tmp_path / "run")


def test_shipped_configs_validate():
  for path in sorted((REPO / "configs").glob("*.py")):
    config_lib.validate(config_lib.from_file(path))


def test_tiny_config_ablations_are_combinable_arguments():
  tiny = str(REPO / "configs" / "tiny.py")
  base = config_lib.from_file(tiny)
  c = config_lib.from_file(tiny, "attention=dsa,moe=8x2,remat=layered,steps=100")
  config_lib.validate(c)
  m = c.model
  assert (m.attention, m.remat_policy, m.scan_unroll, c.train.steps) == ("dsa", "layered", 1, 100)
  # moe=ExK: E experts, top-k, each of hidden FFN / k: the dense model's active FFN size.
  assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden) == (8, 2, base.model.ffn_hidden // 2)
  assert (base.model.attention, base.model.moe.num_experts, base.model.remat_policy) == (
      "dense", 0, "none")
  c = config_lib.from_file(tiny, "moe=4x1,lossfree,attention=dsa,dsa_score=random,"
                                 "dsa_budget=fixed:4,dsa_window=16,width=64,layers=2")
  config_lib.validate(c)
  assert (c.model.moe.aux_loss_weight, c.model.moe.balance_bias_rate) == (0.0, 1e-3)
  assert c.model.dsa.to_dict() == dict(base.model.dsa, window=16, block=16, score="random",
                                       budget="fixed", budget_value=4.0)
  assert (c.model.d_model, c.model.ffn_hidden, c.model.num_layers) == (64, 256, 2)


@pytest.mark.parametrize("arg,message", [
    ("moe=8", "moe='8' must be EXPERTSxTOP_K"),
    ("dsa_budget=4", "dsa_budget='4' must be KIND:VALUE"),
    ("atention=dsa", "'atention' is unknown"),
])
def test_bad_config_arguments_name_the_fix(arg, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_file(REPO / "configs" / "tiny.py", arg)


def test_config_arg_string_parses_typed_values():
  args = config_lib.parse_arg("steps=50,dataset=web_bible,flag", steps=1, dataset="x", flag=False)
  assert args.steps == 50 and args.dataset == "web_bible" and args.flag is True
  with pytest.raises(config_lib.ConfigError, match="unknown"):
    config_lib.parse_arg("nope=1", steps=1)


def test_json_round_trip_restores_the_config(tmp_path):
  c = tiny_config(str(tmp_path))
  again = config_lib.from_json(config_lib.to_json(c))
  assert again.to_dict() == c.to_dict()


@pytest.mark.parametrize("field,value,message", [
    ("block", 40, r"model.dsa.block=40 must be in \[1, model.dsa.window \+ 1 = 33\]"),
    ("budget", "sqrt", r"model.dsa.budget='sqrt' is not supported"),
    ("score", "attention_mass", r"model.dsa.score='attention_mass' is not supported"),
    ("budget_value", 1.5, r"model.dsa.budget_value=1.5 is a fraction"),
    ("window", 0, r"model.dsa.window=0 must be a positive integer"),
])
def test_dsa_fields_are_validated(tmp_path, field, value, message):
  c = tiny_config(str(tmp_path))
  c.model.attention = "dsa"
  c.model.dsa[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 9, r"model.moe.top_k=9 must be in \[1, model.moe.num_experts=8\]"),
    ("every_n_layers", 3, r"model.moe.every_n_layers=3 must divide the 2 layers"),
    ("first_dense_layers", 2, r"model.moe.first_dense_layers=2 must be in \[0, model.num_layers=2\)"),
    ("dispatch", "megablocks", r"model.moe.dispatch='megablocks' is not supported"),
    ("gate_activation", "swiglu", r"model.moe.gate_activation='swiglu' must be one of"),
    ("capacity_factor", -1.0, r"model.moe.capacity_factor=-1.0 must be >= 0"),
])
def test_moe_fields_are_validated(tmp_path, field, value, message):
  c = tiny_config(str(tmp_path))
  c.model.moe.update(num_experts=8, gate_hidden=8, expert_hidden=16)
  c.model.moe[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)
