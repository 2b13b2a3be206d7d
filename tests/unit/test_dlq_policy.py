"""Retry policy per handler (bus/retry.py, RETAILBUS.handlers in bus.yaml):
attempts, backoff schedule, errors that are not retried, and config errors by path."""
from __future__ import annotations

import pytest
import sqlalchemy.exc

from bus.retry import RetryPolicy, error_matches, policy_for
from bus.settings import ConfigError, RetailbusSettings, retailbus_settings

pytestmark = pytest.mark.unit


def settings(**section) -> RetailbusSettings:
    return retailbus_settings({"RETAILBUS": {"root": "/tmp", **section}})


class PostingError(LookupError):
    pass


def test_defaults_come_from_retry():
    policy = policy_for(settings(retry={"delays": [1, 5, 30], "not_retried": ["KeyError"]}), "erp.on_pos_sale")
    assert policy == RetryPolicy((1, 5, 30), ("KeyError",))
    assert policy.attempts == 4


def test_a_handler_sets_its_own_schedule_attempts_and_errors():
    s = settings(retry={"delays": [1, 5, 30], "not_retried": ["KeyError"]},
                 handlers={"erp.on_pos_sale": {"attempts": 5, "delays": [2, 10], "not_retried": []}})
    assert policy_for(s, "erp.on_pos_sale") == RetryPolicy((2, 10, 10, 10), ())  # the last delay repeats
    assert policy_for(s, "erp.on_pos_return").delays == (1, 5, 30)  # others keep the defaults


def test_fewer_attempts_cut_the_schedule_and_one_attempt_never_retries():
    s = settings(handlers={"a.b": {"attempts": 2}, "c.d": {"attempts": 1}, "e.f": {"ordered": True}})
    assert policy_for(s, "a.b").delays == (1, )
    assert policy_for(s, "c.d").delays == () and policy_for(s, "c.d").attempts == 1
    assert policy_for(s, "e.f").not_retried == ()  # inherits the (empty) default list


@pytest.mark.parametrize("names, error, matched", [
    (["KeyError"], KeyError("x"), True),
    (["LookupError"], PostingError(), True),  # a base class covers its subclasses
    ([f"{__name__}.PostingError"], PostingError(), True),  # module.Name
    (["tests.unit.other.PostingError"], PostingError(), False),  # same name, other module
    (["ArithmeticError"], OverflowError("too large"), True),
    (["sqlalchemy.exc.DataError"], sqlalchemy.exc.DataError("stmt", {}, Exception("out of range")), True),
    (["sqlalchemy.exc.DBAPIError"], sqlalchemy.exc.DataError("stmt", {}, Exception("x")), True),
    (["KeyError"], ValueError("x"), False),
    ([], KeyError("x"), False),
])
def test_not_retried_matches_along_the_mro(names, error, matched):
    assert error_matches(error, names) is matched
    assert RetryPolicy((1,), tuple(names)).retries(error) is not matched


@pytest.mark.parametrize("handler, path", [
    ({"attempts": 0}, "RETAILBUS.handlers.erp.on_pos_sale.attempts"),
    ({"delays": [0]}, "RETAILBUS.handlers.erp.on_pos_sale.delays.0"),
    ({"delays": []}, "RETAILBUS.handlers.erp.on_pos_sale.delays"),
    ({"not_retried": ["not a class"]}, "RETAILBUS.handlers.erp.on_pos_sale.not_retried.0"),
    ({"retries": 3}, "RETAILBUS.handlers.erp.on_pos_sale.retries"),
])
def test_bad_policies_are_refused_by_field_path(handler, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        settings(handlers={"erp.on_pos_sale": handler})


def test_attempts_without_any_delay_are_refused():
    with pytest.raises(ConfigError, match=r"handlers\.erp\.on_pos_sale\.attempts: 3 attempts need delays"):
        settings(retry={"delays": []}, handlers={"erp.on_pos_sale": {"attempts": 3}})


def test_dlq_section_defaults_and_is_checked():
    s = settings()
    assert str(s.path(s.dlq.audit_file)) == "/tmp/var/dlq/audit.jsonl" and s.dlq.interval == 15
    with pytest.raises(ConfigError, match=r"RETAILBUS\.dlq\.interval"):
        settings(dlq={"interval": 0})
