import json
import pickle

import pytest
from celery.backends.base import DisabledBackend

from celery_services.core import errors
from celery_services.core.errors import ERRORS, GeneralError, NotFound, ServiceError, error_from_exception

CODES = {
    "BadRequest": 400,
    "NotAuthenticated": 401,
    "PaymentError": 402,
    "Forbidden": 403,
    "NotFound": 404,
    "MethodNotAllowed": 405,
    "NotAcceptable": 406,
    "Timeout": 408,
    "Conflict": 409,
    "Gone": 410,
    "LengthRequired": 411,
    "PayloadTooLarge": 413,
    "Unprocessable": 422,
    "TooManyRequests": 429,
    "GeneralError": 500,
    "NotImplemented": 501,
    "BadGateway": 502,
    "Unavailable": 503,
}


@pytest.mark.parametrize(("name", "code"), sorted(CODES.items()))
def test_codes_and_names(name: str, code: int) -> None:
    cls = getattr(errors, name)
    err = cls("boom", {"field": 1})
    assert isinstance(err, ServiceError)
    assert err.code == code
    assert err.name == name
    assert err.message == "boom"
    assert err.data == {"field": 1}
    assert ERRORS[name] is cls


@pytest.mark.parametrize("name", sorted(CODES))
def test_round_trips(name: str) -> None:
    err = getattr(errors, name)("msg", {"errors": {"title": "required"}})
    for rebuilt in (
        ServiceError.from_dict(json.loads(json.dumps(err.to_dict()))),
        pickle.loads(pickle.dumps(err)),
    ):
        assert type(rebuilt) is type(err)
        assert rebuilt.to_dict() == err.to_dict()
    assert err.errors == {"title": "required"}


def test_json_is_what_a_feathers_server_writes() -> None:
    # Feathers' clients rebuild an error from this body; "data": null makes their constructor throw.
    assert NotFound("No record").to_dict() == {
        "name": "NotFound",
        "message": "No record",
        "code": 404,
        "className": "not-found",
    }
    with_data = errors.BadRequest("Invalid", {"id": 3, "errors": {"title": "required"}}).to_dict()
    assert with_data["data"] == {"id": 3} and with_data["errors"] == {"title": "required"}
    only_errors = errors.BadRequest("Invalid", {"errors": {"title": "required"}}).to_dict()
    assert "data" not in only_errors and only_errors["errors"] == {"title": "required"}
    rebuilt = ServiceError.from_dict(with_data)
    assert rebuilt.data == {"id": 3, "errors": {"title": "required"}}


def test_celery_json_exception_transport_keeps_class_message_and_data() -> None:
    from celery import Celery

    backend = DisabledBackend(app=Celery(set_as_current=False))
    err = NotFound("No record found for id '7'", {"id": 7})
    wire = json.loads(json.dumps(backend.prepare_exception(err, "json")))
    rebuilt = backend.exception_to_python(wire)
    assert type(rebuilt) is NotFound
    assert rebuilt.message == "No record found for id '7'"
    assert rebuilt.data == {"id": 7}


def test_unknown_name_becomes_general_error_keeping_the_name() -> None:
    rebuilt = ServiceError.from_dict({"name": "os.system", "message": "nope", "code": 418, "data": [1]})
    assert type(rebuilt) is GeneralError
    assert rebuilt.name == "os.system"
    assert rebuilt.code == 500
    assert rebuilt.data == [1]
    again = pickle.loads(pickle.dumps(rebuilt))
    assert again.name == "os.system"


def test_error_from_exception_hides_details_unless_debug() -> None:
    plain = error_from_exception(KeyError("title"), call_id="c-1")
    assert type(plain) is GeneralError
    assert plain.message == "Internal error"  # a bug's message may name internals: never sent
    assert plain.data == {"call_id": "c-1"}
    assert error_from_exception(KeyError("title")).data is None
    try:
        raise ValueError("bad")
    except ValueError as exc:
        debug = error_from_exception(exc, debug=True)
    assert debug.data["type"] == "ValueError"
    assert "Traceback" in debug.data["traceback"]
    same = NotFound("x")
    assert error_from_exception(same) is same
