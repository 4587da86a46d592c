"""The rollout role, run by global rank 0: the engine, the prompt stream, dynamic sampling, scoring and
evaluation. It never imports the policy role: it hands the step over as a StepBatch (trainer/batch.py)."""
