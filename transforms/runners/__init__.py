"""Runners of ours: Beam's own, with the fixes our jobs need to run on them (each fix named
after the defect it mends, so it can be sent upstream). The pipelines stay runner-neutral."""

RUNNER_ALIASES = {
    # Beam's create_runner knows DirectRunner, DataflowRunner, FlinkRunner ... but not "DaskRunner"
    "DaskRunner": "transforms.runners.dask_runner.EpeeDaskRunner",
    "daskrunner": "transforms.runners.dask_runner.EpeeDaskRunner",
    "dask": "transforms.runners.dask_runner.EpeeDaskRunner",
    # Beam's own class: its defects break our jobs, so the fixed subclass runs in its place
    "apache_beam.runners.dask.dask_runner.DaskRunner": "transforms.runners.dask_runner.EpeeDaskRunner",
}


def resolve_runner(name: str | None) -> str | None:
    """The runner Beam should create for ``--runner name``: our Dask runner for its short and
    long names, anything else unchanged."""
    if name is None:
        return None
    return RUNNER_ALIASES.get(name, RUNNER_ALIASES.get(name.lower(), name))


def is_dask(name: str | None) -> bool:
    return resolve_runner(name) == RUNNER_ALIASES["DaskRunner"]


def pipeline_runner(options):
    """The runner object to build a pipeline with: the DirectRunner kept off Prism
    (:mod:`transforms.runners.direct`) where ``--runner`` names the DirectRunner or is unset;
    None elsewhere (Beam creates the runner ``--runner`` names, resolved above)."""
    from apache_beam.options.pipeline_options import StandardOptions

    name = options.view_as(StandardOptions).runner
    if name is None or (isinstance(name, str) and name.lower() in ("directrunner", "direct")):
        from .direct import EpeeDirectRunner

        return EpeeDirectRunner()
    return None
