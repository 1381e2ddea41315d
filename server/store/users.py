"""Users, their tokens and browser sessions (only hashes of secrets are stored)."""

from __future__ import annotations

from typing import Any

from .base import StoreBase
from .queries import ONE, Operation, Query
from .records import new_id, now, storable_id


class UserQueries(StoreBase):
    """Users, tokens and sessions."""

    # --- Users, tokens and sessions (only hashes of secrets are stored) ---

    async def add_user(self, name: str, token_hash: str, admin: bool = False) -> str:
        """A new user's id.

        Raises:
            ValueError: a user of that name exists (revoked or not).
        """

        def operation() -> Operation[str]:
            taken = yield Query("SELECT id FROM users WHERE name = :name AND issuer IS NULL", {"name": name}, ONE)
            if taken is not None:
                raise ValueError(f"a user named {name!r} already exists")
            user_id = new_id()
            yield Query(
                "INSERT INTO users (id, name, is_admin, token_hash, created_at) VALUES (:id, :name, :admin, :h, :t)",
                {"id": user_id, "name": name, "admin": 1 if admin else 0, "h": token_hash, "t": now()},
            )
            return user_id

        return await self.write(operation())

    async def list_users(self) -> list[dict[str, Any]]:
        rows = await self._fetch_all(
            "SELECT id, name, is_admin, created_at, revoked_at FROM users ORDER BY created_at, name")
        return [dict(row._mapping) for row in rows]

    async def revoke_user(self, name: str) -> bool:
        """Revoke a user's token and end their sessions; False if there is no such active user."""

        def operation() -> Operation[bool]:
            row = yield Query("SELECT id FROM users WHERE name = :name AND revoked_at IS NULL"
                              " ORDER BY issuer IS NOT NULL, created_at LIMIT 1", {"name": name}, ONE)
            if row is None:
                return False
            yield Query("UPDATE users SET revoked_at = :t WHERE id = :id", {"t": now(), "id": row[0]})
            yield Query("DELETE FROM sessions WHERE user_id = :id", {"id": row[0]})
            return True

        return await self.write(operation())

    async def user_id_by_name(self, name: str) -> str | None:
        if not storable_id(name):
            return None
        # A CLI user first: the app's users' names are labels, and two of them may share one.
        row = await self._fetch_one("SELECT id FROM users WHERE name = :name ORDER BY issuer IS NOT NULL, created_at"
                                    " LIMIT 1", {"name": name})
        return None if row is None else str(row[0])

    async def active_user_count(self) -> int:
        return int(await self._fetch_val("SELECT COUNT(*) FROM users WHERE revoked_at IS NULL") or 0)

    async def identity_user(self, issuer: str, subject: str, name: str, admin: bool) -> dict[str, Any]:
        """The app's user (issuer, subject), created on first sight, with this name and admin flag from now on:
        {id, name, is_admin, revoked_at} (a revoked user stays revoked; the caller refuses them)."""

        def operation() -> Operation[dict[str, Any]]:
            key = {"iss": issuer, "sub": subject}
            row = yield Query("SELECT id, name, is_admin, revoked_at FROM users WHERE issuer = :iss AND subject = :sub",
                              key, ONE)
            if row is None:
                user_id = new_id()
                yield Query("INSERT INTO users (id, name, is_admin, token_hash, created_at, issuer, subject)"
                            " VALUES (:id, :name, :admin, NULL, :t, :iss, :sub)",
                            {"id": user_id, "name": name, "admin": 1 if admin else 0, "t": now(), **key})
                return {"id": user_id, "name": name, "is_admin": admin, "revoked_at": None}
            found = {"id": row[0], "name": row[1], "is_admin": row[2], "revoked_at": row[3]}
            if found["name"] != name or bool(found["is_admin"]) != admin:
                yield Query("UPDATE users SET name = :name, is_admin = :admin WHERE id = :id",
                            {"name": name, "admin": 1 if admin else 0, "id": found["id"]})
            return {**found, "name": name, "is_admin": admin}

        return await self.write(operation())

    async def user_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        row = await self._fetch_one(
            "SELECT id, name, is_admin FROM users WHERE token_hash = :h AND revoked_at IS NULL", {"h": token_hash})
        return None if row is None else dict(row._mapping)

    async def user_by_session_hash(self, secret_hash: str) -> dict[str, Any] | None:
        row = await self._fetch_one(
            "SELECT u.id, u.name, u.is_admin FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.secret_hash = :h AND s.expires_at > :t AND u.revoked_at IS NULL", {"h": secret_hash, "t": now()})
        return None if row is None else dict(row._mapping)

    async def create_session(self, secret_hash: str, user_id: str, expires_at: str) -> None:
        def operation() -> Operation[None]:
            # Expired sessions go when new ones come: the table stays the size of the live ones.
            yield Query("DELETE FROM sessions WHERE expires_at <= :t", {"t": now()})
            yield Query(
                "INSERT INTO sessions (secret_hash, user_id, created_at, expires_at) VALUES (:h, :u, :t, :e)",
                {"h": secret_hash, "u": user_id, "t": now(), "e": expires_at},
            )

        await self.write(operation())

    async def delete_session(self, secret_hash: str) -> None:
        def operation() -> Operation[None]:
            yield Query("DELETE FROM sessions WHERE secret_hash = :h", {"h": secret_hash})

        await self.write(operation())


