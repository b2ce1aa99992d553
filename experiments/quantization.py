"""INT8 quantization (SPEC 3.1, article 4.1-4.2): quality, speed and selective experts.

Parts (`--parts`, all by default):

quality     Held-out bits/byte of the tiny model, dense (`configs/tiny.py`) and GMoE
            (`moe=8x2`): a stage-1 parent (1,000 steps), then 200 more steps from it for
            every variant (`stage=qat`, same data and schedule), so each is compared with
            a float control of equal training:
              f32          the float control (`quant=none`);
              ptq_4x4 / ptq_channel   the control's weights rounded, no training;
              qat_4x4      QAT, 4x4 blocks, the rounding penalty (lambda 0.1 -> 0.01);
              qat_4x4_no_penalty      the ablation;
              qat_channel  QAT, one scale per output channel, the penalty;
              qwix_channel qwix's own QAT (dense only: qwix cannot reach the experts),
                           per channel, FFN only, no penalty.
            Rules: the article's advice (`rules.default_rules`: FFN / experts INT8,
            attention FP16; embedding, head and router as trained). Every quantized
            variant is scored through its `quantize` export (weight-only INT8 matmuls),
            and the 4x4 and channel QAT exports also with INT8 x INT8 dots.
classifier  A sentence classifier on real labels standing in for GLUE: the reward stage
            (`stage=reward,layers=2`, a scalar head on a 2-layer stage-1 trunk, Rotten
            Tomatoes fresh vs rotten, held out by movie): accuracy at the best threshold
            and pairwise accuracy, f32 vs PTQ vs QAT (same rules, 300 steps each).
speed       Prefill ms (1 x 512 tokens) and decode tokens/s (KV cache, batch 1, 64
            tokens) of one random-init model (width 512, 4 layers; FFN and attention
            weights quantized, so every projection runs the path): f32, bf16, INT8
            weight-only and INT8 dots, 4x4 and per-channel blocks; interleaved rounds,
            median. Ratios are against f32 in the same run.
experts     The GMoE parent with only M of its 8 experts per layer (profiled on
            wiki_excerpt's train split): parameter bytes against bits/byte in domain
            (wiki_excerpt validation) and out of domain (lee_news validation).

  python -m experiments.quantization --out docs/figures/quantization.json
  python -m experiments.quantization --quick --out /tmp/quantization.json   # smoke run
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.infer import expert_selection
from experiments import common

PARTS = ("quality", "classifier", "speed", "experts")
MODELS = {"dense": "configs/tiny.py", "moe": "configs/tiny.py:moe=8x2"}
VARIANTS = {  # name: configs/tiny.py arguments of the 200-step stage from the parent.
    "f32": "stage=qat,quant=none",
    "qat_4x4": "stage=qat",
    "qat_4x4_no_penalty": "stage=qat,penalty=0",
    "qat_channel": "stage=qat,block=channel",
    "qwix_channel": "stage=qat,quant=ffn=int8,block=channel,penalty=0,engine=qwix",
}
PTQ = {"ptq_4x4": "4x4", "ptq_channel": "channel"}
INT8_DOTS = ("qat_4x4", "qat_channel")
CLASSIFIER_BASE = "configs/tiny.py:layers=2"
CLASSIFIER = "configs/tiny.py:stage=reward,layers=2"
SPEED_MODEL = "configs/tiny.py:width=512"
SPEED_RULES = "ffn=int8,attention=int8"
KEEP = (8, 6, 4, 3, 2)
QUICK = dict(base="steps=20", stage="steps=10", classifier="steps=10", rounds=1,
             prefill=64, decode=8, keep=(8, 4, 2), eval_batches=2)


def evaluate_workdir(workdir, int8_dot: bool | None = None, dataset: str | None = None,
                     experts_keep: int = 0, max_batches: int = 0) -> dict[str, Any]:
  """Held-out figures of a workdir as `eval` computes them (exports included)."""
  from dsv2_jax.train import evaluate, trainer  # pylint: disable=g-import-not-at-top
  config = trainer.inference_config(trainer.load_config(workdir))
  if int8_dot is not None:
    config.quant.int8_dot = int8_dot
  run = trainer.Run(config, workdir)
  params, shardings, _ = run.trained_params()
  extra = {}
  if experts_keep:  # As `eval --experts_keep`, profiled on the run's own train split.
    full = expert_selection.parameter_bytes(params)
    params, shardings = run.keep_experts(params, experts_keep, config.data.dataset)
    extra = {"param_bytes": expert_selection.parameter_bytes(params), "full_bytes": full}
  if dataset:
    config.data.dataset = dataset
  eval_fn = evaluate.make_eval_fn(run.model, run.tokenizer, run.mesh, shardings)
  result = evaluate.evaluate(eval_fn, params, config, run.tokenizer, run.mesh, max_batches)
  return {**result, **extra}


def ml_collections_copy(section, **changes):
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(section.to_dict())
  out.update(changes)
  return out


def exported(run_dir, out_dir, **kwargs) -> dict[str, Any]:
  """The `quantize` export of `run_dir` (written once) and its bytes report."""
  import json  # pylint: disable=g-import-not-at-top
  from dsv2_jax.quant import export  # pylint: disable=g-import-not-at-top
  report_file = out_dir / export.REPORT_FILE
  if not report_file.exists():
    export.export(run_dir, out_dir, **kwargs)
  return json.loads(report_file.read_text())


def quality(args, data_dir, root, quick) -> dict[str, Any]:
  out: dict[str, Any] = {}
  eval_batches = QUICK["eval_batches"] if quick else 0
  for model_name, spec in MODELS.items():
    base = common.with_args(spec, QUICK["base"]) if quick else spec
    base_dir = root / model_name / "base"
    runs: dict[str, Any] = {"base": common.train_stage(base, base_dir, data_dir)}
    figures: dict[str, Any] = {}
    for name, variant in VARIANTS.items():
      if name not in args.variants:
        continue
      if name.startswith("qwix") and "moe" in model_name:
        continue  # qwix's QAT intercepts einsums; the GMoE experts run their own matmuls.
      stage = common.with_args(spec, variant, *([QUICK["stage"]] if quick else []))
      runs[name] = common.train_stage(stage, root / model_name / name, data_dir,
                                      init_from=str(base_dir))
      if name == "f32":  # Scored like the others (the same batches under --quick).
        result = evaluate_workdir(root / model_name / name, max_batches=eval_batches)
        figures[name] = {"bits_per_byte": result["bits_per_byte"]}
        continue
      report = exported(root / model_name / name, root / model_name / f"{name}_int8")
      result = evaluate_workdir(root / model_name / f"{name}_int8", max_batches=eval_batches)
      figures[name] = {"bits_per_byte": result["bits_per_byte"],
                       "qat_run_bits_per_byte": runs[name]["bits_per_byte"],  # Full split.
                       "quantized_f32_over_stored": report["total"]["f32_over_stored"],
                       "groups": report["groups"]}
      if name in INT8_DOTS:
        dots = evaluate_workdir(root / model_name / f"{name}_int8", int8_dot=True,
                                max_batches=eval_batches)
        figures[name]["int8_dot_bits_per_byte"] = dots["bits_per_byte"]
    for name, block in PTQ.items():
      report = exported(root / model_name / "f32", root / model_name / name, block=block)
      result = evaluate_workdir(root / model_name / name, max_batches=eval_batches)
      figures[name] = {"bits_per_byte": result["bits_per_byte"], "groups": report["groups"]}
    f32 = figures["f32"]["bits_per_byte"]
    for fig in figures.values():
      fig["vs_f32"] = fig["bits_per_byte"] / f32 - 1
    out[model_name] = {"runs": runs, "figures": figures}
  return out


def classifier(args, data_dir, root, quick) -> dict[str, Any]:
  base = common.with_args(CLASSIFIER_BASE, QUICK["base"]) if quick else CLASSIFIER_BASE
  extra = [QUICK["classifier"]] if quick else []
  base_dir = root / "classifier" / "base"
  runs = {"base": common.train_stage(base, base_dir, data_dir)}
  rules = "ffn=int8+attention=fp16"
  variants = {"f32": [], "qat_4x4": [f"quant={rules}"],
              "qat_channel": [f"quant={rules}", "block=channel"]}
  variants = {name: v for name, v in variants.items() if name in args.variants}
  for name, args_ in variants.items():
    runs[name] = common.train_stage(common.with_args(CLASSIFIER, *args_, *extra),
                                    root / "classifier" / name, data_dir,
                                    init_from=str(base_dir))
  keys = ("accuracy", "pairwise_accuracy", "loss")
  figures = {"f32": {k: runs["f32"][k] for k in keys}}
  for name, source, block in [("ptq_4x4", "f32", "4x4"), ("ptq_channel", "f32", "channel"),
                              ("qat_4x4", "qat_4x4", None), ("qat_channel", "qat_channel",
                                                            None)]:
    if source not in variants:
      continue
    target = root / "classifier" / f"{name}_int8"
    exported(root / "classifier" / source, target, rules=rules.replace("+", ","),
             block=block)
    result = evaluate_workdir(target)
    figures[name] = {k: result[k] for k in keys}
  for fig in figures.values():
    fig["accuracy_kept"] = fig["accuracy"] / figures["f32"]["accuracy"]
  return {"runs": runs, "figures": figures}


def speed(args, quick) -> dict[str, Any]:
  """Prefill and decode of one random-init model in every storage format."""
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  from dsv2_jax.infer.generate import generate
  from dsv2_jax.model.transformer import build_model
  from dsv2_jax.quant import qat as qat_lib, rules as rules_lib
  prefill_len = QUICK["prefill"] if quick else 512
  decode_len = QUICK["decode"] if quick else 64
  rounds = QUICK["rounds"] if quick else 5
  config = common.load_config(SPEED_MODEL)
  model = build_model(config.model)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (1, prefill_len)), jnp.int32)
  boxed = model.init(jax.random.PRNGKey(0), tokens[:, :8])["params"]
  params = nn.meta.unbox(boxed)
  bf16_cfg = ml_collections_copy(config.model, dtype="bfloat16", param_dtype="bfloat16")
  cases: dict[str, tuple[Any, Any]] = {
      "f32": (model, params),
      "bf16": (build_model(bf16_cfg), jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)),
  }
  for block in ("4x4", "channel"):
    quant = qat_lib.QAT(rules_lib.plan(rules_lib.parse(SPEED_RULES, block), boxed))
    cases[f"int8_weight_only_{block}"] = (model, quant.store(params, int8_dot=False))
    cases[f"int8_dot_{block}"] = (model, quant.store(params, int8_dot=True))
  prompt = np.asarray(tokens[:, :16])

  def prefill_case(m, p):
    fn = jax.jit(lambda p, t: m.apply({"params": p}, t))
    fn(p, tokens).block_until_ready()
    return lambda: common.timed(lambda: fn(p, tokens).block_until_ready())

  def decode_case(m, p):
    run = lambda: generate(m, p, prompt, jax.random.PRNGKey(0),  # noqa: E731
                           max_new_tokens=decode_len, temperature=0.0)
    np.asarray(run())
    return lambda: common.timed(lambda: np.asarray(run()))

  prefill = common.interleaved({n: prefill_case(*c) for n, c in cases.items()}, rounds)
  decode = common.interleaved({n: decode_case(*c) for n, c in cases.items()}, rounds)
  out = {}
  for name in cases:
    p_ms = statistics.median(prefill[name]) * 1e3
    d_tps = decode_len / statistics.median(decode[name])
    out[name] = {"prefill_ms": p_ms, "decode_tokens_per_s": d_tps, "prefill_samples_s":
                 prefill[name], "decode_samples_s": decode[name]}
  for name in cases:
    out[name]["prefill_speedup_vs_f32"] = out["f32"]["prefill_ms"] / out[name]["prefill_ms"]
    out[name]["decode_speedup_vs_f32"] = (out[name]["decode_tokens_per_s"]
                                          / out["f32"]["decode_tokens_per_s"])
  return {"model": SPEED_MODEL, "rules": SPEED_RULES, "prefill_tokens": prefill_len,
          "decode_tokens": decode_len, "rounds": rounds, "cases": out}


def experts(args, data_dir, root, quick) -> dict[str, Any]:
  base_dir = root / "moe" / "base"  # The quality part's GMoE parent (trained here if absent).
  spec = MODELS["moe"]
  common.train_stage(common.with_args(spec, QUICK["base"]) if quick else spec, base_dir,
                     data_dir)
  batches = QUICK["eval_batches"] if quick else 0
  counts = {domain: profile_counts(base_dir, dataset)
            for domain, dataset in (("in_domain", "wiki_excerpt"), ("out_of_domain", "lee_news"))}
  out = []
  for keep in (QUICK["keep"] if quick else KEEP):
    row = {"experts_keep": keep}
    # Share of the top-k picks that land on the kept experts (chosen on in-domain data).
    kept = expert_selection.kept_experts(counts["in_domain"], keep)
    for domain, c in counts.items():
      row[f"{domain}_pick_share"] = float(np.mean([
          np.take_along_axis(c[p], kept[p], -1).sum(-1) / c[p].sum(-1) for p in c]))
    for domain, dataset in (("in_domain", "wiki_excerpt"), ("out_of_domain", "lee_news")):
      r = evaluate_workdir(base_dir, dataset=dataset, experts_keep=keep, max_batches=batches)
      row[domain] = r["bits_per_byte"]
      row.update(param_bytes=r["param_bytes"], full_bytes=r["full_bytes"])
    out.append(row)
  return {"profiled_on": "wiki_excerpt:train (16 batches of 32 x 128 tokens)", "rows": out}


def profile_counts(workdir, dataset: str) -> dict[str, np.ndarray]:
  """Expert selection counts of a run on `dataset`'s train split (16 batches)."""
  # pylint: disable=g-import-not-at-top
  from dsv2_jax.data import pipeline
  from dsv2_jax.train import trainer
  config = trainer.load_config(workdir)
  run = trainer.Run(config, workdir)
  params, _, _ = run.trained_params()
  data = ml_collections_copy(config.data, dataset=dataset, eval_split="train")
  return expert_selection.profile(run.model, params, pipeline.eval_batches(
      data, run.tokenizer, config.eval.batch_size, 16))


def plot(result: dict[str, Any], png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [p for p in ("quality", "speed", "experts") if p in result]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, part in zip(axes[0], panels):
    if part == "quality":
      names = list(result["quality"]["dense"]["figures"])
      for i, model_name in enumerate(result["quality"]):
        figs = result["quality"][model_name]["figures"]
        xs = [j + 0.4 * i for j, n in enumerate(names) if n in figs]
        ax.bar(xs, [figs[n]["bits_per_byte"] for n in names if n in figs], 0.4,
               label=model_name)
      ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
      ax.set_ylabel("held-out bits/byte")
      lows = [f["bits_per_byte"] for m in result["quality"].values()
              for f in m["figures"].values()]
      ax.set_ylim(min(lows) * 0.97, max(lows) * 1.02)
      ax.legend()
      ax.set_title("quality (weight-only INT8 exports)")
    elif part == "speed":
      cases = result["speed"]["cases"]
      names = list(cases)
      ax.bar(np.arange(len(names)) - 0.2, [cases[n]["prefill_speedup_vs_f32"] for n in names],
             0.4, label="prefill")
      ax.bar(np.arange(len(names)) + 0.2, [cases[n]["decode_speedup_vs_f32"] for n in names],
             0.4, label="decode")
      ax.axhline(1.0, color="gray", lw=0.8)
      ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
      ax.set_ylabel("speed vs f32 (same run)")
      ax.legend()
      ax.set_title(f"speed ({result['machine']['cpu'][:40]})")
    else:
      rows = result["experts"]["rows"]
      mib = [r["param_bytes"] / 2**20 for r in rows]
      for domain in ("in_domain", "out_of_domain"):
        ax.plot(mib, [r[domain] for r in rows], "o-", label=domain.replace("_", " "))
      for r, x in zip(rows, mib):
        ax.annotate(f"M={r['experts_keep']}", (x, r["in_domain"]), fontsize=8)
      ax.set_xlabel("parameter MiB")
      ax.set_ylabel("held-out bits/byte")
      ax.legend()
      ax.set_title("selective experts (profiled on wiki_excerpt)")
  fig.tight_layout()
  fig.savefig(png, dpi=120)


def main(argv: list[str]) -> None:
  parser = common.chain_parser(__doc__, "runs/quantization")
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="QAT variants of the quality and classifier parts (f32 always runs: "
                      "the control, and the source of the PTQ variants).")
  parser.add_argument("--quick", action="store_true", help="Smoke run (minutes).")
  args = parser.parse_args(argv)
  args.variants = {"f32", *args.variants.split(",")}
  unknown = args.variants - set(VARIANTS)
  if unknown:
    parser.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
  parts = args.parts.split(",")
  unknown = set(parts) - set(PARTS)
  if unknown:
    parser.error(f"--parts: unknown {sorted(unknown)}; choose from {list(PARTS)}")
  data_dir, root = common.chain_dirs(args)
  result: dict[str, Any] = {"command": common.command("experiments.quantization", argv)}
  start = time.perf_counter()
  if "quality" in parts:
    result["quality"] = quality(args, data_dir, root, args.quick)
  if "classifier" in parts:
    result["classifier"] = classifier(args, data_dir, root, args.quick)
  if "speed" in parts:
    result["speed"] = speed(args, args.quick)
  if "experts" in parts:
    result["experts"] = experts(args, data_dir, root, args.quick)
  result["seconds"] = time.perf_counter() - start
  summary = {}
  for model_name, q in result.get("quality", {}).items():
    summary[f"{model_name} bits/byte"] = {n: round(f["bits_per_byte"], 4)
                                          for n, f in q["figures"].items()}
  if "classifier" in result:
    summary["classifier accuracy"] = {n: round(f["accuracy"], 4)
                                      for n, f in result["classifier"]["figures"].items()}
  if "speed" in result:
    summary["speed vs f32 (prefill, decode)"] = {
        n: [round(c["prefill_speedup_vs_f32"], 2), round(c["decode_speedup_vs_f32"], 2)]
        for n, c in result["speed"]["cases"].items()}
  if "experts" in result:
    summary["experts (M: MiB, in, out)"] = {
        r["experts_keep"]: [round(r["param_bytes"] / 2**20, 2), round(r["in_domain"], 4),
                            round(r["out_of_domain"], 4)] for r in result["experts"]["rows"]}
  result["summary"] = summary
  common.write(result, args.out, lambda png: plot(result, png))


if __name__ == "__main__":
  main(sys.argv[1:])
