"""Beam side of epee-beam: readers, the early-exit ModelHandler for RunInference, Parquet writers.

``epee/`` holds the models and the engine and never imports Beam; this package adapts them.
"""
