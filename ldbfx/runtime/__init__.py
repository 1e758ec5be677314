"""The run time of a transformed model: its state (:mod:`.state`), the module itself (:mod:`.module`),
the API that sets layer and branch drops and rows (:mod:`.mask`, :mod:`.branch_mask`), measuring
passes that leave it unchanged (:mod:`.measure`) and the DDP/FSDP2 helpers (:mod:`.distributed`).
The ops a rewritten graph calls are :mod:`ldbfx.ops`.
"""
