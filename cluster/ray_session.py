"""How a `tandem` command joins a running Ray cluster or starts a local one, and keeps Ray's
chatter out of the command's output.

What is quieted in this process, and where it came from (Ray 2.60): Ray's INFO lines ("Started
a local Ray instance") through `ray.init(logging_level=WARNING)`; Serve's driver-side INFO lines
("Started Serve in namespace", "Application ... is ready", "Deleting app"), whose logger
`ray.serve` Serve configures at import, by raising it to WARNING; the token-authentication
notice that `ray.init` logs on every start or join ("Token authentication is enabled for this
Ray cluster", logger `ray._private.authentication.authentication_token_setup`), by raising that
logger to ERROR (token authentication itself stays as Ray sets it: on for a new local cluster).
Warnings and errors still print. What the cluster's processes print is set where they start
(`serve.start(logging_config=...)` for Serve's controller and proxies, in `serve_cli`).
"""
from __future__ import annotations

import logging
import os

TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_logging() -> None:
    import ray.serve  # noqa: F401  (it sets its logger's level when first imported: set ours after)

    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def join_cluster(address: str = "auto", log_to_driver: bool = False) -> None:
    """Connect this process to the Ray cluster at `address` ("auto": the one on this machine,
    or RAY_ADDRESS). ConnectionError, with what to do, when there is none."""
    import ray

    quiet_ray_logging()
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    except ConnectionError as error:
        where = os.environ.get("RAY_ADDRESS") if address == "auto" and os.environ.get("RAY_ADDRESS") else address
        if where == "auto":
            raise ConnectionError("no Ray cluster is running on this machine (start one with `tandem serve`, "
                                  "or pass --address HOST:PORT)") from error
        hint = ""
        if not os.environ.get("RAY_AUTH_MODE") and os.path.isfile(os.path.expanduser("~/.ray/auth_token")):
            # Ray turns token authentication on by itself only for a cluster it finds ("auto").
            hint = " (if it uses token authentication, set RAY_AUTH_MODE=token)"
        raise ConnectionError(f"cannot reach the Ray cluster at {where}: "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}{hint}") from error


def start_or_join(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` (default: RAY_ADDRESS, else one running on this machine);
    with none running, start a local Ray. True when this process started it (it goes away with
    this process)."""
    import ray

    quiet_ray_logging()
    address = address or os.environ.get("RAY_ADDRESS", "auto")
    if address != "local":
        try:
            join_cluster(address, log_to_driver=True)
            return False
        except ConnectionError:
            if address != "auto":
                raise
    # A local Ray. Its CPU count is a scheduling unit, not a core; ingress + two engine pools
    # need more units than a small machine's core count (they share cores).
    ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
             logging_level=logging.WARNING)
    return True
