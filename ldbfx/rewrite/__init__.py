"""The graph pass: the rewrite rules per op family (:mod:`.handlers`, which the analysis also reads
to tell layers apart), the gates of branch drop (:mod:`.gates`) and the driver that runs it all,
:func:`ldbfx.transform` (:mod:`.driver`).
"""
