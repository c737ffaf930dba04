"""python -m services.ingest: the HTTP API and the bucket-drop watcher."""

from __future__ import annotations

import sys

import uvicorn

from common.logs import setup_logging
from common.settings import get_settings
from services.ingest.app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    app = create_app(settings)
    # On SIGTERM, requests in flight get SHUTDOWN_GRACE_S to finish; then those still running (an
    # upload longer than that) are cancelled, so that the app's shutdown (its consumers handing
    # back their messages, common.runner) runs before the orchestrator's kill.
    server = uvicorn.Server(uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s))
    # Event streams end when the server is stopping (it waits for open responses to finish).
    app.state.exiting = lambda: server.should_exit
    app.state.stop_serving = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.get("broker_refused") is not None:
        sys.exit(1)  # the reason is in the log (app.stop_on_a_refused_broker)


if __name__ == "__main__":
    main()
