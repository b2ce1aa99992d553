"""Stage 3 after instruction tuning: the reward model, PPO and DPO (SPEC 2.1).

Instruction tuning itself is the language-model trainer on `data.format='chat'`
examples (`dsv2_jax/data/chat.py`); this package holds what is new about
preference learning.
"""
