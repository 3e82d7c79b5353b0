"""An EXTERNAL worker pool for portable runners (Flink's job server, Beam's local job service):
``python -m transforms.runners.worker_pool --port 50000``, then run a pipeline with
``--environment_type EXTERNAL --environment_config 127.0.0.1:50000``.

Beam's own ``apache_beam.runners.worker.worker_pool_main`` listens on every interface (``[::]``)
and starts each SDK worker as a bare ``python`` from ``PATH``, which on a machine with a
virtual environment is not the interpreter that has torch and this project. This pool binds to
127.0.0.1 unless told otherwise (``--host``) and starts workers with its own interpreter
(``sys.executable``) and environment (``HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1`` set).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import subprocess
import sys
import threading

import grpc
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer, kill_process_gracefully
from apache_beam.utils import thread_pool_executor

log = logging.getLogger(__name__)


class LocalWorkerPool(BeamFnExternalWorkerPoolServicer):
    """Beam's pool, starting SDK worker processes with this interpreter."""

    def StartWorker(self, start_worker_request, unused_context):  # noqa: N802 - the gRPC method's name
        if not self._use_process or self._container_executable:
            return super().StartWorker(start_worker_request, unused_context)
        command = [sys.executable, "-c",
                   "from apache_beam.runners.worker.sdk_worker import SdkHarness; "
                   f"SdkHarness({start_worker_request.control_endpoint.url!r}, "
                   f"worker_id={start_worker_request.worker_id!r}, state_cache_size={int(self._state_cache_size)}, "
                   f"data_buffer_time_limit_ms={int(self._data_buffer_time_limit_ms)}).run()"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            self._worker_processes[start_worker_request.worker_id] = subprocess.Popen(command, close_fds=True, env=env)
        except OSError as exc:
            return beam_fn_api_pb2.StartWorkerResponse(error=f"cannot start an SDK worker: {exc}")
        log.info("started SDK worker %s (pid %d)", start_worker_request.worker_id,
                 self._worker_processes[start_worker_request.worker_id].pid)
        return beam_fn_api_pb2.StartWorkerResponse()


def serve(host: str = "127.0.0.1", port: int = 0, use_process: bool = True) -> tuple[str, grpc.Server]:
    """Start the pool; returns its address (``host:port``) and the gRPC server."""
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)])
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    pool = LocalWorkerPool(use_process=use_process, state_cache_size=0, data_buffer_time_limit_ms=-1)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    server.start()

    def stop_workers():
        for process in list(pool._worker_processes.values()):
            kill_process_gracefully(process)

    atexit.register(stop_workers)
    return f"{host}:{bound}", server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m transforms.runners.worker_pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=50000, help="port (0: any free one; the address is printed)")
    parser.add_argument("--threads", action="store_true",
                        help="run SDK workers as threads of this process instead of child processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    address, server = serve(args.host, args.port, use_process=not args.threads)
    print(address, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # stopped by PID: its SDK workers go with it (atexit)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=2)


if __name__ == "__main__":
    main()
