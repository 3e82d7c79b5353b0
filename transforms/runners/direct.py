"""Beam's DirectRunner, kept off Prism.

Beam 2.77's DirectRunner first offers a pipeline to the PrismRunner, which downloads its binary
from GitHub at run time: offline that is a network wait and an empty ``/tmp/beam-temp*`` left
behind, then a fall-back to the FnApiRunner. It keeps a pipeline off Prism only for a few
constructs (``direct_runner.py``, ``_PrismRunnerSupportVisitor``): DoFn exception handling,
TestStream, unsafe triggers, interactive runs. Our pipelines used to qualify by accident,
through RunInference's exception handling; with the regrouping DoFn (transforms.inference)
nothing in them does. This runner is the DirectRunner with its ``_is_interactive`` flag set,
which Beam reads only to skip that offer (``direct_runner.py`` lines 131 and 208); the rest,
the FnApiRunner with multi_processing mode and every option, is the DirectRunner's own.
"""

from __future__ import annotations

from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner


class EpeeDirectRunner(SwitchingDirectRunner):
    """The DirectRunner without the Prism offer (module docstring)."""

    _is_interactive = True  # read by the DirectRunner only to keep a pipeline off Prism
