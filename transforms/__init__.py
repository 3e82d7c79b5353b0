"""Beam side of epee-beam: PTransforms, DoFns, the early-exit ModelHandler and I/O.

Empty until the Beam pipelines issue (#4); ``epee/`` holds the engine it will wrap.
"""
