"""Model code: layers, attention, feed-forward, the decoder, and remat policies.

Shape alphabet, used in every einsum string and shape comment in the repo:
  B batch              T query length        S key/value length
  D model width        N query heads         K key/value heads
  H head dim           F FFN hidden          V vocabulary
  E experts            C expert capacity     L layers
  X tokens = B * T, flattened batch-major

Dense layers see the residual stream as 2-D tokens [X, D]; only attention reshapes to
[B, T, N, H]. On XLA:CPU this avoids transposing copy fusions in the weight-gradient
dots that cost ~20% of a step with [B, T, D] activations (docs/results.md); on
accelerators it is neutral.

Logical axis names (mapped to mesh axes only in `dsv2_jax.parallel.sharding`):
  parameters   vocab, embed, heads, kv_heads, kv, mlp, expert, expert_mlp, gate_mlp,
               layers, norm
  activations  tokens (X), batch, length, act_embed, act_heads, act_kv_heads, act_kv,
               act_mlp, act_vocab
"""
