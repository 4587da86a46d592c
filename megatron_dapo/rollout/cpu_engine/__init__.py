"""A CPU inference server of the project's own that speaks SGLang's HTTP protocol (see __main__ to run it).

It runs the Hugging Face model with transformers (no model code of ours), batches requests continuously,
samples and reports log-probs as SGLang does, and takes weights through SGLang's weight-update endpoints.
"""
