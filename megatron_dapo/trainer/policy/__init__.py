"""The policy role, run by every rank: the Megatron policy, pi_old, the clipped updates, checkpoints.

It never imports the rollout role: what it trains on arrives as a RankBatch (trainer/batch.py)."""
