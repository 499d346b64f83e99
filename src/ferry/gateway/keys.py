"""Virtual keys: created by the admin, stored hashed, looked up by hash on every request."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

from sqlalchemy import Engine, delete, insert, select, update

from ferry.gateway.db import keys_table

KEY_PREFIX = "sk-ferry-"


def hash_key(secret: str) -> str:
    # NOTE: keys are 32 random bytes, so a fast hash is enough: there is nothing to brute-force that
    # a slow password hash would protect, and it keeps the per-request lookup cheap.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeySpec:
    """What the admin asks for when creating a key; validated here (ValueError naming the field)."""

    name: str
    team: str | None = None
    models: tuple[str, ...] | None = None  # None = every model
    data_class: str | None = None  # None = the config's default
    budget_usd: float | None = None
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("name: must be a non-empty string")
        if self.team is not None and (not isinstance(self.team, str) or not self.team):
            raise ValueError("team: must be a non-empty string or null")
        if self.models is not None and not all(isinstance(m, str) and m for m in self.models):
            raise ValueError("models: must be a list of model names or null")
        if self.budget_usd is not None and (not isinstance(self.budget_usd, (int, float))
                                            or isinstance(self.budget_usd, bool) or self.budget_usd < 0):
            raise ValueError("budget_usd: must be a non-negative number or null")
        for name in ("rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}: must be a positive integer or null")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    team: str | None
    key_prefix: str
    models: tuple[str, ...] | None
    data_class: str | None
    budget_usd: float | None
    rpm: int | None
    tpm: int | None
    created_at: float

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, object]:
        d = asdict(self)
        d["models"] = list(self.models) if self.models is not None else None
        return d

    def spec(self) -> KeySpec:
        """Its settings, as the admin gave them (what ``KeyStore.update`` replaces)."""
        return KeySpec(name=self.name, team=self.team, models=self.models, data_class=self.data_class,
                       budget_usd=self.budget_usd, rpm=self.rpm, tpm=self.tpm)


def _settings(spec: KeySpec) -> dict[str, object]:
    return {"name": spec.name, "team": spec.team,
            "models": json.dumps(list(spec.models)) if spec.models is not None else None,
            "data_class": spec.data_class, "budget_usd": spec.budget_usd, "rpm": spec.rpm, "tpm": spec.tpm}


def _record(row: object) -> KeyRecord:
    m = row._mapping  # type: ignore[attr-defined]
    models = json.loads(m["models"]) if m["models"] is not None else None
    return KeyRecord(id=m["id"], name=m["name"], team=m["team"], key_prefix=m["key_prefix"],
                     models=tuple(models) if models is not None else None, data_class=m["data_class"],
                     budget_usd=m["budget_usd"], rpm=m["rpm"], tpm=m["tpm"], created_at=m["created_at"])


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """Store a new key; returns the record and the secret, which is shown this once only."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = secrets.token_hex(8)
        row = {"id": key_id, "key_hash": hash_key(secret), "key_prefix": secret[: len(KEY_PREFIX) + 4],
               **_settings(spec), "created_at": time.time()}
        with self._engine.begin() as conn:
            conn.execute(insert(keys_table).values(**row))
        return self.get(key_id), secret  # type: ignore[return-value]

    def get(self, key_id: str) -> KeyRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(keys_table).where(keys_table.c.id == key_id)).first()
        return _record(row) if row is not None else None

    def lookup(self, secret: str) -> KeyRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(keys_table).where(keys_table.c.key_hash == hash_key(secret))).first()
        return _record(row) if row is not None else None

    def list(self) -> list[KeyRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(keys_table).order_by(keys_table.c.created_at)).all()
        return [_record(r) for r in rows]

    def update(self, key_id: str, spec: KeySpec) -> KeyRecord | None:
        """Replace a key's settings (its secret and id stay); None when there is no such key.

        NOTE: limits and budgets read the key's row at each request, so a change applies to the next one.
        """
        with self._engine.begin() as conn:
            changed = conn.execute(update(keys_table).where(keys_table.c.id == key_id).values(**_settings(spec)))
            if changed.rowcount == 0:
                return None
        return self.get(key_id)

    def delete(self, key_id: str) -> bool:
        with self._engine.begin() as conn:
            return conn.execute(delete(keys_table).where(keys_table.c.id == key_id)).rowcount > 0
