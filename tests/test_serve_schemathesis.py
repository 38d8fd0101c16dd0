"""Schemathesis against the server's own /openapi.json: generated requests (valid and invalid) never get a
5xx, and every response matches the documented status codes, content types and schemas.

The document names the served model, so valid requests really generate. Not checked: that every
schema-valid request is accepted, because some are refused by design with a 400 the schema cannot express
(an image while the model has no vision, a JSON schema this server cannot enforce, a prompt past the context).
"""

import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, settings

from omnigpt.infer.engine import EngineConfig
from omnigpt.serve.app import create_app
from omnigpt.serve.checkpoint import load_for_serving
from omnigpt.serve.testing import ServerThread, make_tiny_checkpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = load_for_serving(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), max_seq_len=128))
    app = create_app(served, EngineConfig(cpu_threads=1, max_batch_size=8, max_queue=64, prefix_cache_rows=2))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_openapi_contract(case):
    case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])
