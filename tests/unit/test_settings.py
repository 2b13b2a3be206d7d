"""bus/settings.py: bus.yaml loads with ${ENV:default} like nameko does, the RETAILBUS
section validates with errors naming the field, relative paths hang off the project root."""
from __future__ import annotations

from pathlib import Path

import pytest

from bus.settings import ConfigError, RetailbusSettings, load_config, retailbus_settings

pytestmark = pytest.mark.unit

PROJECT = Path(__file__).resolve().parents[2]
SHIPPED = PROJECT / "config" / "bus.yaml"


def write(tmp_path, text: str) -> Path:
    folder = tmp_path / "proj" / "config"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bus.yaml"
    path.write_text(text)
    return path


# --- load_config ------------------------------------------------------------------------

def test_env_default_is_used_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("RB_TEST_URI", raising=False)
    monkeypatch.delenv("RB_TEST_PORT", raising=False)
    path = write(tmp_path, "AMQP_URI: ${RB_TEST_URI:amqp://x@h:5682/v}\n"
                           "PORT: ${RB_TEST_PORT:5682}\nEMPTY: ${RB_TEST_URI:}\n")
    config = load_config(path)
    assert config["AMQP_URI"] == "amqp://x@h:5682/v"
    assert config["PORT"] == 5682  # YAML-typed like nameko
    assert config["EMPTY"] is None


def test_env_value_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("RB_TEST_URI", "amqp://u:p@broker:1234/rb")
    monkeypatch.setenv("RB_TEST_PORT", "7000")
    path = write(tmp_path, "AMQP_URI: ${RB_TEST_URI:amqp://default}\nPORT: ${RB_TEST_PORT:5682}\n")
    assert load_config(path) == {"AMQP_URI": "amqp://u:p@broker:1234/rb", "PORT": 7000}


def test_env_inside_nested_section(tmp_path, monkeypatch):
    monkeypatch.setenv("RB_TEST_PORT", "6000")
    path = write(tmp_path, "RETAILBUS:\n  broker:\n    port: ${RB_TEST_PORT:5682}\n")
    settings = retailbus_settings(load_config(path), path)
    assert settings.broker.port == 6000


def test_empty_file_is_empty_config(tmp_path):
    assert load_config(write(tmp_path, "")) == {}


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_config_error(tmp_path):
    path = write(tmp_path, "RETAILBUS: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


# --- retailbus_settings -----------------------------------------------------------------

def test_defaults_without_section(tmp_path):
    settings = retailbus_settings({}, tmp_path / "proj" / "config" / "bus.yaml")
    assert settings.broker.port == 5682 and settings.broker.user == "retailbus"
    assert settings.retry.delays == [1.0, 5.0, 30.0]
    assert settings.stores == []


@pytest.mark.parametrize("section, path", [
    ({"broker": {"port": "abc"}}, "RETAILBUS.broker.port"),
    ({"broker": {"port": 70000}}, "RETAILBUS.broker.port"),
    ({"publisher": {"window": 0}}, "RETAILBUS.publisher.window"),
    ({"publisher": {"confirm_timeout": -1}}, "RETAILBUS.publisher.confirm_timeout"),
    ({"retry": {"prefetch": 0}}, "RETAILBUS.retry.prefetch"),
    ({"stores": [{"id": "S001"}, {"id": "bad id"}]}, "RETAILBUS.stores.1.id"),
    ({"services": {"erp": {}}}, "RETAILBUS.services.erp.module"),
    ({"brokr": {}}, "RETAILBUS.brokr"),
    ({"broker": {"prot": 1}}, "RETAILBUS.broker.prot"),
])
def test_errors_name_the_field_path(tmp_path, section, path):
    config_path = tmp_path / "proj" / "config" / "bus.yaml"
    with pytest.raises(ConfigError) as info:
        retailbus_settings({"RETAILBUS": section}, config_path)
    message = str(info.value)
    assert message.startswith(f"{config_path}: ")
    assert f"{path}:" in message


def test_error_from_file_names_file_and_field(tmp_path):
    path = write(tmp_path, "RETAILBUS:\n  broker:\n    port: not-a-port\n")
    with pytest.raises(ConfigError, match=r"bus\.yaml: RETAILBUS\.broker\.port: "):
        retailbus_settings(load_config(path), path)


def test_root_is_the_folder_above_config(tmp_path):
    path = write(tmp_path, "RETAILBUS:\n  stores:\n    - {id: S009}\n")
    settings = retailbus_settings(load_config(path), path)
    root = (tmp_path / "proj").resolve()
    assert settings.root == root
    assert settings.path("var/broker") == root / "var" / "broker"
    assert settings.path("/abs/x") == Path("/abs/x")
    store = settings.stores[0]
    assert settings.outbox_path(store) == root / "var" / "stores" / "S009" / "outbox.db"


def test_root_defaults_to_cwd_without_config_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert retailbus_settings({}).root == tmp_path


def test_explicit_root_and_outbox(tmp_path):
    settings = retailbus_settings({"RETAILBUS": {
        "root": str(tmp_path), "stores": [{"id": "S1", "outbox": "data/o.db"},
                                          {"id": "S2", "outbox": "/srv/o.db"}]}})
    assert settings.outbox_path(settings.stores[0]) == tmp_path / "data" / "o.db"
    assert settings.outbox_path(settings.stores[1]) == Path("/srv/o.db")


def test_absolute_dsn(tmp_path):
    settings = RetailbusSettings(root=tmp_path)
    assert settings.absolute_dsn("sqlite:///var/erp.db") == f"sqlite:///{(tmp_path / 'var' / 'erp.db').resolve()}"
    assert settings.absolute_dsn("sqlite:////abs/erp.db") == "sqlite:////abs/erp.db"
    assert settings.absolute_dsn("postgresql://u@h/db") == "postgresql://u@h/db"


def test_settings_are_frozen(tmp_path):
    settings = RetailbusSettings(root=tmp_path)
    with pytest.raises(Exception):
        settings.broker.port = 1  # type: ignore[misc]
    assert settings.broker.port == 5682


# --- the shipped file ---------------------------------------------------------------------

def test_shipped_bus_yaml_loads_and_validates(monkeypatch):
    for var in ("RETAILBUS_AMQP_URI", "WEB_SERVER_ADDRESS", "RETAILBUS_STORE", "RETAILBUS_LEGACY_DB"):
        monkeypatch.delenv(var, raising=False)
    config = load_config(SHIPPED)
    assert config["AMQP_URI"] is None
    assert config["STORE_ID"] == "S001"
    assert config["LEGACY_DB_URI"] == "sqlite:///var/legacy_erp.db"
    assert config["LOGGING"]["formatters"]["json"]["()"] == "bus.logs.JsonFormatter"
    settings = retailbus_settings(config, SHIPPED)
    assert settings.root == PROJECT
    assert [s.id for s in settings.stores] == ["S001", "S002"]
    assert settings.services["erp"].module == "services.erp"
    assert settings.broker.port == 5682
    assert settings.absolute_dsn(config["LEGACY_DB_URI"]) == f"sqlite:///{PROJECT / 'var' / 'legacy_erp.db'}"


def test_shipped_bus_yaml_via_relative_path(monkeypatch):
    monkeypatch.chdir(PROJECT)
    settings = retailbus_settings(load_config("config/bus.yaml"), "config/bus.yaml")
    assert settings.root == PROJECT
