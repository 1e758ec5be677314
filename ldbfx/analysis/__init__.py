"""Analysis of a captured graph: its layers in topological order (:mod:`.layers`) and its residual
branches (:mod:`.branches`), found before anything is changed.
"""
