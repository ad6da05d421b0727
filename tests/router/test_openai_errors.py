"""Every error the ingress sends has OpenAI's shape, built in one place (`ApiError.body`): `code`
is a string identifier or null, as OpenAI sends it, never the HTTP status as an integer."""
from __future__ import annotations

import json

import pydantic
import pytest

from tandem.router.openai_ingress import ApiError, error_response
from tandem.router.openai_protocol import ErrorInfo


def test_an_error_without_an_identifier_has_a_null_code_not_the_status():
    response = error_response(ApiError(400, "n must be at most 16, got 100", param="n"))
    assert response.status_code == 400
    assert json.loads(response.body) == {"error": {"message": "n must be at most 16, got 100",
                                                   "type": "invalid_request_error", "param": "n", "code": None}}


def test_an_error_with_an_identifier_keeps_it_as_a_string():
    error = ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
    assert json.loads(error_response(error).body)["error"]["code"] == "invalid_api_key"
    assert error.body().error.code == "invalid_api_key"  # the same object goes into SSE error lines


def test_an_integer_code_is_refused():
    with pytest.raises(pydantic.ValidationError):
        ErrorInfo(message="x", type="server_error", code=500)
