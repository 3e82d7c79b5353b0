"""Benchmarks and real-data proofs (not tests); see docs/benchmarks.md. What the scripts share
(corpora, splits, the Beam-stock baseline, timing) is in :mod:`bench.common`."""
