"""Model code: layers, attention, feed-forward, the decoder, and remat policies.

Shape alphabet: one letter, one meaning, in every einsum string and shape comment in
the repo. A new size gets a new letter; no letter is reused.
  Sequence and model
    B  batch (rows)
    T  queries: query or sequence length (a chunk's query rows in a kernel)
    S  keys: key/value length, decode-cache slots, or a gathered key set
    X  tokens = B T, flattened batch-major
    D  model width                      V  vocabulary
    L  layers
  Attention
    N  query heads                      K  key/value heads
    G  query heads per key/value head (grouped-query attention): N = K G
    H  head dim
  Multi-head latent attention (mla.py)
    c  KV latent width (mla.kv_lora_rank)
    q  query latent width (mla.q_lora_rank)
    r  decoupled RoPE width (mla.qk_rope_head_dim); H is then the no-RoPE part
    O  value head width (mla.v_head_dim)
  Feed-forward and mixture-of-experts (moe*.py)
    F  FFN hidden width (the dense FFN's and each expert's)
    I  router (gate) hidden width
    E  experts
    A  experts chosen per token (model.moe.top_k, "k" in prose); X A token-expert pairs
    C  expert capacity: rows kept per expert
    R  rows of the expert-sorted dispatch buffer
  Dynamic sparse attention (dsa*.py, docs/dsa.md)
    W  local window                     P  block: queries sharing one selection
    U  query blocks; Tp = U P is T padded to whole blocks
    M  selection slots per block
    J  blocks per chunk of the global kernel
  Pipeline (dsv2_jax.parallel.pipeline)
    Z  pipeline stages                  Y  microbatches
Lower-case words in brackets are counts named in the text (ep: expert-parallel shards;
rows: a group's rows), and 2F is twice F.

Dense layers see the residual stream as 2-D tokens [X, D]; only attention reshapes to
[B, T, N, H]. On XLA:CPU this avoids transposing copy fusions in the weight-gradient
dots (docs/results.md, "Layout"); on accelerators it is neutral.

Logical axis names (mapped to mesh axes only in `dsv2_jax.parallel.sharding`):
  parameters   vocab, embed, heads, kv_heads, kv, q_lora, kv_lora, mlp, expert,
               expert_mlp, gate_mlp, layers, norm
  activations  tokens (X), batch, length, act_embed, act_heads, act_kv_heads, act_kv,
               act_kv_lora, act_mlp, act_vocab
"""
