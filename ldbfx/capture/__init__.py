"""Capture: the model as one graph, by ``torch.fx`` (:mod:`.trace`) or ``torch.export`` from an example
batch (:mod:`.export`), and the facts of a capture the run time checks again (hooks, autocast).
"""
