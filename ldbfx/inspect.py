"""Inspection: a layer table and the layer DAG (placeholder, filled in below)."""
def summary(gm, *args, **kwargs): raise NotImplementedError
def to_networkx(gm): raise NotImplementedError
