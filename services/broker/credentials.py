"""The component users' passwords, and how the users reach the broker.

Passwords are generated once and kept in `var/broker_users/<user>.json`
(mode 0600); all users are applied with one `rabbitmqctl import_definitions`
(salted password hashes, never clear text, in a 0600 file removed right after).
What each user may do is services/broker/users.py's business.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path

from bus.broker_uri import with_user
from bus.settings import RetailbusSettings
from services.broker.setup import write_private
from services.broker.users import Component, identity


def password_hash(password: str) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def load_password(path: Path, user: str) -> str | None:
    try:
        creds = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return creds["password"] if creds.get("user") == user else None


def save_password(path: Path, user: str, password: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user": user, "password": password}, f)
    os.chmod(path, 0o600)


def definitions(found: list[Component], vhost: str, passwords: dict[str, str]) -> dict:
    """RabbitMQ definitions for `import_definitions`: users without tags, their
    permissions and topic permissions on `vhost`."""
    users, perms, topics = [], [], []
    for c in found:
        users.append({"name": c.user, "password_hash": password_hash(passwords[c.user]),
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []})
        configure, write, read = c.access.permissions()
        perms.append({"user": c.user, "vhost": vhost, "configure": configure, "write": write, "read": read})
        for exchange, (tw, tr) in c.access.topic_permissions().items():
            topics.append({"user": c.user, "vhost": vhost, "exchange": exchange, "write": tw, "read": tr})
    return {"users": users, "permissions": perms, "topic_permissions": topics}


def provision(broker, found: list[Component]) -> None:
    """Create or update every component's user on the managed `broker` in one call;
    a password is generated once and kept (0600) so running components keep working."""
    passwords = {}
    for c in found:
        passwords[c.user] = load_password(c.credentials, c.user) or secrets.token_urlsafe(24)
    staged = broker.home / "users.definitions.json"  # the node reads the file itself
    write_private(staged, json.dumps(definitions(found, broker.vhost, passwords)))
    try:
        broker.rabbitmqctl("import_definitions", str(staged), "--format", "json")
    finally:
        staged.unlink()
    for c in found:
        save_password(c.credentials, c.user, passwords[c.user])


def component_uri(bus_uri: str, component: Component) -> str | None:
    """`bus_uri` with the component's own user, once `provision` gave it one."""
    return _with_user(bus_uri, component.user, component.credentials)


def own_uri(settings: RetailbusSettings, bus_uri: str, name: str) -> str | None:
    """What `retailbus up` gives component `name`: its own user once provisioned."""
    return _with_user(bus_uri, *identity(settings, name))


def _with_user(bus_uri: str, user: str, credentials: Path) -> str | None:
    password = load_password(credentials, user)
    return None if password is None else with_user(bus_uri, user, password)
