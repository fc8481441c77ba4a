"""The notebook face of pagedq (``import pagedq.jupyter_ext``): magics, widgets, shared engine.

Imported lazily: the engine core never imports Jupyter packages.
"""
