"""Checkpoints: the one Megatron <-> Hugging Face mapping (hf_mapping), the conversion tools (convert), and a
built model's save/load to a Megatron checkpoint directory (model_io)."""
