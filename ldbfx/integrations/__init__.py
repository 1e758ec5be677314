"""Integrations on the public API: routing a model's own ``forward`` through its graph (:mod:`.install`),
the Hugging Face Trainer callback (:mod:`.hf`, needs transformers) and inspection (:mod:`.inspection`:
the layer table, FLOPs per layer and branch, the layer DAG).
"""
