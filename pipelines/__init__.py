"""Runnable jobs. ``engine_demo`` is the main job until the Beam pipelines land (issue #4)."""
