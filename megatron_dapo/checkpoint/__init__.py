"""Checkpoints: the conversion tools (convert), RL checkpoints that resume exactly (rl_state), and a built
model's save/load to a Megatron checkpoint directory (model_io); names and layouts come from
model/hf_mapping."""
