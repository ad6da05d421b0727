"""One real local Ray cluster (and the Serve HTTP proxy on a loopback port) for the whole
reliability package; each module deploys its own app on it with `app_at` and deletes it at
module end, so a killed replica or a fuzzed ingress never leaks into another module's figures."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from ray import serve

from tandem.workers.app import build_app
from tests.router.serve_harness import local_serve
from tandem.engine.make_model import make_model


@pytest.fixture(scope="package")
def ray_serve(tmp_path_factory):
    model_dir = str(make_model(tmp_path_factory.mktemp("reliability") / "llama", "llama", seed=5))
    with local_serve() as url:
        yield {"url": url, "model_dir": model_dir}


@contextlib.contextmanager
def app_at(ray_serve: dict, name: str, **app_args) -> Iterator[str]:
    """Runs `build_app(app_args)` as app `name` at route prefix /<name>; yields its base URL."""
    args = dict(model=ray_serve["model_dir"], served_model_name="tiny", ingress_num_cpus=0, worker_num_cpus=0)
    args.update(app_args)
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        yield f"{ray_serve['url']}/{name}"
    finally:
        serve.delete(name)


EDGE_API_KEY = "reliability-key"
EDGE_MAX_BODY_BYTES = 16 << 10


@pytest.fixture(scope="package")
def edge_app(ray_serve):
    """The app hostile-input and security tests hit (one for both modules, to save a start-up):
    API key required, 16 KiB bodies, 8 requests in flight."""
    with app_at(ray_serve, "edge", api_key=EDGE_API_KEY, max_body_bytes=EDGE_MAX_BODY_BYTES, max_in_flight=8,
                engine_kwargs={"max_model_len": 256, "num_kv_blocks": 96, "max_num_seqs": 8}) as url:
        yield url
