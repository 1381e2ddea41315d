"""The embedding app's users (issue 16) against real server processes: JWTs signed with a shared secret or with
the keys of a JWKS (served from this test process, and rotated mid-test), and a trusted proxy's user header.

Tokens are minted with PyJWT here; the attacks PyJWT will not mint (an HS256 token keyed with the RSA public key's
PEM) are built by hand from hmac. Every refusal is checked over HTTP, POST /api/session and the WebSocket (its
handshake header and its `auth` frame).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.config import ConfigError, load_settings
from server.upstream.offline import demo_words

from .conftest import (
    JWT_SHAPE,
    SERVER_CWD,
    SERVER_PYTHON,
    RelayServer,
    _clean_env,
    assert_no_secret_in_log,
    assert_no_traceback,
    free_port,
)
from .relay_clients import names, sse_stream, text_of

WS_PATH = "/api/command-center/ws"
SECRET = "test-shared-secret-of-the-embedding-app-0123456789"
ISSUER = "https://app.example"
AUDIENCE = "deltarelay"
WORDS = 40


def answer_to(message: str, words: int = WORDS) -> str:
    return "".join(demo_words([{"role": "user", "content": message}], words))


def claims(sub: str = "user-1", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "name": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **extra}


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_keyed_with(payload: dict[str, Any], key: bytes, kid: str | None = None) -> str:
    """The algorithm-confusion token: HS256 whose HMAC key is a public key's PEM (PyJWT refuses to mint it)."""
    head = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = b64(json.dumps(head).encode()) + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- A JWKS server in this process -------------------------------------------------------------------------


class Key:
    """A signing key and its public JWK."""

    def __init__(self, kid: str, kind: str = "RSA") -> None:
        self.kid = kid
        self.alg = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}[kind]
        if kind == "RSA":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            algorithm: Any = jwt.algorithms.RSAAlgorithm
        elif kind == "EC":
            self.private = ec.generate_private_key(ec.SECP256R1())
            algorithm = jwt.algorithms.ECAlgorithm
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            algorithm = jwt.algorithms.OKPAlgorithm
        self.jwk: dict[str, Any] = {**json.loads(algorithm.to_jwk(self.private.public_key())), "kid": kid,
                                    "use": "sig"}
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, payload: dict[str, Any], kid: str | None = "") -> str:
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else {}
        return jwt.encode(payload, self.private, algorithm=self.alg, headers=headers)


class JwksServer:
    """GET / answers {"keys": [...]} of the current keys; `requests` counts the fetches."""

    def __init__(self, keys: list[Key], port: int | None = None) -> None:
        self.keys = keys
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.requests += 1
                body = json.dumps({"keys": [key.jwk for key in owner.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()


# --- Servers ---------------------------------------------------------------------------------------------


def add_cli_user(server: RelayServer, name: str) -> str:
    result = subprocess.run([SERVER_PYTHON, "-m", "server", "users", "--database-url", server.database_url, "add",
                             name], cwd=SERVER_CWD, env=_clean_env({}), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def hs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayServer]:
    """RELAY_JWT_SECRET with an issuer and an audience; answers paced so that they are still running."""
    server = RelayServer(tmp_path_factory.mktemp("hs"), {
        "RELAY_JWT_SECRET": SECRET, "RELAY_JWT_ISSUER": ISSUER, "RELAY_JWT_AUDIENCE": AUDIENCE,
        "RELAY_AUTH_CACHE_SECONDS": "0", "RELAY_OFFLINE_DELAY_MS": "25", "RELAY_OFFLINE_WORDS": str(WORDS),
        "RELAY_WS_AUTH_TIMEOUT_SECONDS": "1",
    })
    yield server
    server.stop()
    assert_no_traceback(server)
    assert_no_secret_in_log(server)


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {"a": Key("key-a"), "b": Key("key-b"), "ec": Key("key-ec", "EC"), "ed": Key("key-ed", "OKP"),
            "stranger": Key("key-a")}  # same kid as a, another key: a bad signature


@pytest.fixture(scope="module")
def jwks(keys: dict[str, Key]) -> Iterator[JwksServer]:
    server = JwksServer([keys["a"], keys["ec"], keys["ed"]])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jwks_server(tmp_path_factory: pytest.TempPathFactory, jwks: JwksServer) -> Iterator[RelayServer]:
    """RELAY_JWKS_URL only (no secret): an unknown kid fetches the JWKS again at most once a second."""
    server = RelayServer(tmp_path_factory.mktemp("jwks"), {
        "RELAY_JWKS_URL": jwks.url, "RELAY_JWT_ISSUER": ISSUER, "RELAY_JWKS_REFETCH_SECONDS": "1",
        "RELAY_AUTH_CACHE_SECONDS": "0",
    })
    yield server
    server.stop()
    assert_no_traceback(server)
    assert_no_secret_in_log(server)


async def session_of(server: RelayServer, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        return await client.get("/api/session", headers=bearer(token))


def error_code(res: httpx.Response) -> str:
    code: str = res.json()["error"]["code"]
    return code


async def ws_auth(server: RelayServer, token: str) -> tuple[Any, dict[str, Any]]:
    """A socket opened without credentials that sends `auth`: the socket and the server's answer."""
    socket = await websockets.connect(server.ws_url + WS_PATH)
    await socket.send(json.dumps({"type": "auth", "token": token}))
    frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
    return socket, frame


async def closed_code(socket: Any) -> int | None:
    """Read until the server closes the socket; its close code."""
    async with asyncio.timeout(15):
        try:
            while True:
                await socket.recv()
        except ConnectionClosed:
            pass
    return socket.close_code  # type: ignore[no-any-return]


# --- Settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, message", [
    ({"RELAY_JWT_SECRET": "short"}, "RELAY_JWT_SECRET must be at least 32 bytes"),
    ({"RELAY_JWKS_URL": "ftp://keys.example"}, "RELAY_JWKS_URL must be an http:// or https:// URL"),
    ({"RELAY_TRUSTED_USER_HEADER": "X-Forwarded-User"}, "RELAY_TRUSTED_USER_HEADER needs RELAY_TRUSTED_PROXIES"),
    ({"RELAY_TRUSTED_USER_HEADER": "X-Forwarded-User", "RELAY_TRUSTED_PROXIES": "10.0.0.0/8,nonsense"},
     "RELAY_TRUSTED_PROXIES entries must be CIDRs"),
    ({"RELAY_TRUSTED_USER_HEADER": "X Forwarded", "RELAY_TRUSTED_PROXIES": "10.0.0.0/8"},
     "RELAY_TRUSTED_USER_HEADER must be a header name"),
    ({"RELAY_TRUSTED_ADMIN_HEADER": "X-Admin"}, "RELAY_TRUSTED_ADMIN_HEADER needs RELAY_TRUSTED_USER_HEADER"),
    ({"RELAY_JWT_LEEWAY_SECONDS": "-1"}, "RELAY_JWT_LEEWAY_SECONDS must be 0 or more"),
    ({"RELAY_WS_AUTH_TIMEOUT_SECONDS": "0"}, "RELAY_WS_AUTH_TIMEOUT_SECONDS must be greater than 0"),
])
def test_a_bad_identity_setting_is_refused_with_one_line_naming_it(env, message):
    with pytest.raises(ConfigError) as refused:
        load_settings(env)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert "short" not in str(refused.value)  # a secret's value is never repeated


def test_a_short_jwt_secret_stops_the_server_with_one_line(tmp_path):
    result = subprocess.run([SERVER_PYTHON, "-m", "server", "--port", str(free_port())], cwd=SERVER_CWD,
                            env=_clean_env({"DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
                                            "RELAY_JWT_SECRET": "too-short-a-secret"}),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert len(lines) == 1 and "RELAY_JWT_SECRET must be at least 32 bytes" in lines[0], lines
    assert "too-short-a-secret" not in result.stderr + result.stdout


def test_identity_settings_turn_open_mode_off(tmp_path):
    """Bound to loopback with no CLI user, the server would be open; with a JWT secret it asks for credentials."""
    assert load_settings({"RELAY_JWT_SECRET": SECRET}).host_identity
    server = RelayServer(tmp_path, {"RELAY_JWT_SECRET": SECRET})
    try:
        res = httpx.get(server.url + "/api/conversations")
        assert res.status_code == 401 and error_code(res) == "unauthorized"
        assert "open mode" not in server.log()
    finally:
        server.stop()


# --- Shared secret: who the user is --------------------------------------------------------------------------


async def test_a_jwt_user_is_made_on_first_sight_and_renamed_by_a_later_token(hs_server):
    res = await session_of(hs_server, hs(claims("sub-rename", name="Ann")))
    assert res.status_code == 200 and res.json()["user"] == {"name": "Ann", "admin": False, "anonymous": False}
    res = await session_of(hs_server, hs(claims("sub-rename", name="Ann Smith", admin=True)))
    assert res.json()["user"] == {"name": "Ann Smith", "admin": True, "anonymous": False}
    rows = hs_server.rows("SELECT name, is_admin, issuer, token_hash FROM users WHERE subject = ?", "sub-rename")
    assert rows == [("Ann Smith", 1, ISSUER, None)]
    # No name claim: the sub names the user.
    res = await session_of(hs_server, hs({k: v for k, v in claims("sub-nameless").items() if k != "name"}))
    assert res.json()["user"]["name"] == "sub-nameless"


async def test_a_jwt_user_streams_over_sse_and_sees_their_usage(hs_server):
    token = hs(claims("sub-stream"))
    events = await sse_stream(hs_server.url, {"message": "hello over sse"}, headers=bearer(token))
    assert names(events)[-1] == "done" and text_of(events) == answer_to("hello over sse")
    async with httpx.AsyncClient(base_url=hs_server.url, timeout=30) as client:
        usage = await client.get("/api/usage", headers=bearer(token))
    assert usage.status_code == 200 and usage.json()["scope"] == "own"


REFUSALS: list[tuple[str, Callable[[], str], str]] = [
    ("expired", lambda: hs(claims(exp=int(time.time()) - 120)), "token_expired"),
    ("not yet valid", lambda: hs(claims(nbf=int(time.time()) + 600)), "unauthorized"),
    ("issued in the future", lambda: hs(claims(iat=int(time.time()) + 600)), "unauthorized"),
    ("wrong issuer", lambda: hs(claims(iss="https://evil.example")), "unauthorized"),
    ("no issuer", lambda: hs({k: v for k, v in claims().items() if k != "iss"}), "unauthorized"),
    ("wrong audience", lambda: hs(claims(aud="another-service")), "unauthorized"),
    ("bad signature", lambda: hs(claims(), secret="another-secret-of-at-least-32-bytes!!"), "unauthorized"),
    ("alg none", lambda: jwt.encode(claims(), None, algorithm="none"), "unauthorized"),
    ("missing sub", lambda: hs({k: v for k, v in claims().items() if k != "sub"}), "unauthorized"),
    ("missing exp", lambda: hs({k: v for k, v in claims().items() if k != "exp"}), "unauthorized"),
    ("malformed", lambda: "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln", "unauthorized"),
]


@pytest.mark.parametrize("token_of, code", [(t, c) for _, t, c in REFUSALS], ids=[n for n, _, _ in REFUSALS])
async def test_every_bad_jwt_is_refused_on_every_transport(hs_server, token_of, code):
    token = token_of()
    async with httpx.AsyncClient(base_url=hs_server.url, timeout=30) as client:
        for method, path, body in (("GET", "/api/conversations", None),
                                   ("POST", "/api/command-center/message", {"message": "spend"})):
            res = await client.request(method, path, json=body, headers={**bearer(token), "Accept": "application/json"})
            assert res.status_code == 401 and error_code(res) == code, (method, path, res.text)
        res = await client.post("/api/session", json={"token": token})
        assert res.status_code == 401 and error_code(res) == code and "set-cookie" not in res.headers
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(hs_server.ws_url + WS_PATH, additional_headers=bearer(token)):
            pass
    assert refused.value.response.status_code == 401
    socket, frame = await ws_auth(hs_server, token)
    assert frame["event"] == "error" and frame["data"]["code"] == code
    assert await closed_code(socket) == 4401
    assert "JWT refused" in hs_server.log()


async def test_an_hs256_token_keyed_with_an_rsa_public_key_is_refused(hs_server, keys):
    token = hs256_keyed_with(claims(), keys["a"].public_pem)
    res = await session_of(hs_server, token)
    assert res.status_code == 401 and error_code(res) == "unauthorized"


# --- Ownership -----------------------------------------------------------------------------------------------


async def test_a_jwt_users_conversation_is_a_404_to_another_jwt_user_and_to_a_cli_user(hs_server):
    owner = hs(claims("sub-owner"))
    events = await sse_stream(hs_server.url, {"message": "mine"}, headers=bearer(owner))
    conversation_id = events[0][2]["conversationId"]
    stream_id = events[0][2]["streamId"]
    cli = add_cli_user(hs_server, "cli-user")
    async with httpx.AsyncClient(base_url=hs_server.url, timeout=30) as client:
        path = f"/api/conversations/{conversation_id}/messages"
        assert (await client.get(path, headers=bearer(owner))).status_code == 200
        for other in (hs(claims("sub-other")), cli):
            res = await client.get(path, headers=bearer(other))
            assert res.status_code == 404, res.text
            listed = (await client.get("/api/conversations", headers=bearer(other))).json()["conversations"]
            assert conversation_id not in [c["id"] for c in listed]
            res = await client.post("/api/command-center/message", headers=bearer(other),
                                    json={"message": "intrude", "conversationId": conversation_id})
            assert res.status_code == 404
            res = await client.get(f"/api/command-center/streams/{stream_id}", headers=bearer(other))
            assert res.status_code in (404, 410)
            res = await client.post(f"/api/command-center/streams/{stream_id}/cancel", headers=bearer(other))
            assert res.status_code == 404
        # The CLI user keeps working beside the JWT users.
        assert (await client.get("/api/session", headers=bearer(cli))).json()["user"]["name"] == "cli-user"


# --- Sessions (EventSource) -----------------------------------------------------------------------------------


async def test_a_session_from_a_jwt_ends_no_later_than_its_exp(hs_server):
    exp = int(time.time()) + 90
    async with httpx.AsyncClient(base_url=hs_server.url, timeout=30) as client:
        res = await client.post("/api/session", json={"token": hs(claims("sub-session", exp=exp))})
        assert res.status_code == 200
        cookie = res.headers["set-cookie"]
        max_age = int(re.search(r"Max-Age=(\d+)", cookie, re.IGNORECASE).group(1))  # type: ignore[union-attr]
        assert 0 < max_age <= 90
        assert (await client.get("/api/session")).json()["user"]["name"] == "sub-session"  # the cookie works
    (expires_at,) = hs_server.rows("SELECT s.expires_at FROM sessions s JOIN users u ON u.id = s.user_id"
                                   " WHERE u.subject = ?", "sub-session")[0]
    assert str(expires_at) <= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(exp)) + ".999999Z"


# --- The WebSocket --------------------------------------------------------------------------------------------


async def test_the_auth_frame_authenticates_a_socket_and_other_frames_before_it_are_unauthorized(hs_server):
    exp = int(time.time()) + 300
    async with websockets.connect(hs_server.ws_url + WS_PATH) as socket:
        for frame in ({"type": "ping"}, {"type": "message", "message": "too soon", "requestId": "r0"}):
            await socket.send(json.dumps(frame))
            error = json.loads(await asyncio.wait_for(socket.recv(), 10))
            assert error["event"] == "error" and error["data"]["code"] == "unauthorized"
        await socket.send(json.dumps({"type": "auth", "token": hs(claims("sub-ws", name="Wes", exp=exp))}))
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
        assert frame["event"] == "authenticated" and frame["streamId"] is None and frame["id"] is None
        assert frame["data"]["name"] == "Wes" and frame["data"]["expiresAt"] == exp and frame["data"]["userId"]
        await socket.send(json.dumps({"type": "message", "message": "hello over ws", "requestId": "r1"}))
        events = []
        while not events or events[-1][1] not in ("done", "error"):
            data = json.loads(await asyncio.wait_for(socket.recv(), 10))
            if data["event"] != "keepalive":
                events.append((data["id"], data["event"], data["data"]))
    assert names(events)[-1] == "done" and text_of(events) == answer_to("hello over ws")


async def test_a_socket_that_sends_no_auth_before_the_deadline_is_closed_with_4401(hs_server):
    async with websockets.connect(hs_server.ws_url + WS_PATH) as socket:
        started = time.monotonic()
        assert await closed_code(socket) == 4401
        assert 0.8 <= time.monotonic() - started < 10  # RELAY_WS_AUTH_TIMEOUT_SECONDS=1


async def test_an_auth_frame_on_an_open_socket_extends_it_and_one_of_another_user_closes_it(hs_server):
    soon = int(time.time()) + 2
    socket, frame = await ws_auth(hs_server, hs(claims("sub-refresh", exp=soon)))
    try:
        assert frame["event"] == "authenticated"
        later = int(time.time()) + 300
        await socket.send(json.dumps({"type": "auth", "token": hs(claims("sub-refresh", exp=later))}))
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
        assert frame["event"] == "authenticated" and frame["data"]["expiresAt"] == later
        await asyncio.sleep(max(soon - time.time(), 0) + 1.0)  # past the first token's exp
        await socket.send('{"type": "ping"}')
        assert json.loads(await asyncio.wait_for(socket.recv(), 10)) == {"event": "pong"}
        # A bad refresh is an error, and the socket keeps its good token.
        await socket.send(json.dumps({"type": "auth", "token": hs(claims("sub-refresh"), secret="x" * 40)}))
        assert json.loads(await asyncio.wait_for(socket.recv(), 10))["data"]["code"] == "unauthorized"
        await socket.send('{"type": "ping"}')
        assert json.loads(await asyncio.wait_for(socket.recv(), 10)) == {"event": "pong"}
        await socket.send(json.dumps({"type": "auth", "token": hs(claims("sub-someone-else"))}))
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
        assert frame["event"] == "error" and frame["data"]["code"] == "unauthorized"
        assert await closed_code(socket) == 4401
    finally:
        await socket.close()


async def test_at_exp_the_socket_gets_token_expired_and_4401_and_its_answer_is_saved_and_resumed_exactly(
        tmp_path):
    server = RelayServer(tmp_path, {"RELAY_JWT_SECRET": SECRET, "RELAY_OFFLINE_DELAY_MS": "50",
                                    "RELAY_OFFLINE_WORDS": "80", "RELAY_AUTH_CACHE_SECONDS": "0"})
    try:
        message = "a long answer"
        exp = int(time.time()) + 2
        token = jwt.encode({"sub": "sub-expiry", "exp": exp}, SECRET, algorithm="HS256")
        socket, frame = await ws_auth(server, token)
        assert frame["event"] == "authenticated"
        await socket.send(json.dumps({"type": "message", "message": message}))
        seen: list[tuple[int, str, dict[str, Any]]] = []
        expired = None
        try:
            async with asyncio.timeout(15):
                while True:
                    data = json.loads(await socket.recv())
                    if data["event"] == "error" and data["streamId"] is None:
                        expired = data
                        continue
                    if data["event"] != "keepalive":
                        seen.append((data["id"], data["event"], data["data"]))
        except ConnectionClosed:
            pass
        assert expired is not None and expired["data"]["code"] == "token_expired"
        assert socket.close_code == 4401
        assert seen and names(seen)[-1] not in ("done", "error"), "the answer should outlast the token"
        assert time.time() >= exp
        stream_id = seen[0][2]["streamId"]
        # The answer goes on and is saved whole.
        async with asyncio.timeout(20):
            while server.rows("SELECT status FROM messages WHERE stream_id = ? AND role = 'assistant'",  # noqa: ASYNC110
                              stream_id) != [("complete",)]:  # the state is in another process
                await asyncio.sleep(0.1)
        fresh = jwt.encode({"sub": "sub-expiry", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
        again, frame = await ws_auth(server, fresh)
        try:
            assert frame["event"] == "authenticated"
            await again.send(json.dumps({"type": "resume", "streamId": stream_id, "lastEventId": seen[-1][0]}))
            rest = []
            async with asyncio.timeout(15):
                while not rest or rest[-1][1] not in ("done", "error"):
                    data = json.loads(await again.recv())
                    if data["event"] != "keepalive":
                        rest.append((data["id"], data["event"], data["data"]))
        finally:
            await again.close()
        whole = seen + rest
        assert [event_id for event_id, _, _ in whole] == list(range(1, len(whole) + 1))
        assert names(whole)[-1] == "done" and text_of(whole) == answer_to(message, 80)
        (content,) = server.rows("SELECT content FROM messages WHERE stream_id = ? AND role = 'assistant'",
                                 stream_id)[0]
        assert content == answer_to(message, 80)
    finally:
        server.stop()
    assert_no_traceback(server)
    assert_no_secret_in_log(server)


# --- A JWKS, rotated ------------------------------------------------------------------------------------------


async def test_tokens_signed_with_each_kind_of_jwks_key_are_accepted(jwks_server, keys):
    for kind in ("a", "ec", "ed"):
        res = await session_of(jwks_server, keys[kind].sign(claims(f"sub-{kind}")))
        assert res.status_code == 200, (kind, res.text)
    socket, frame = await ws_auth(jwks_server, keys["ed"].sign(claims("sub-ed")))
    await socket.close()
    assert frame["event"] == "authenticated"


async def test_with_only_a_jwks_hs_tokens_and_wrongly_signed_ones_are_refused(jwks_server, keys):
    tokens = {
        "hs token": hs(claims()),
        "hs keyed with the public key": hs256_keyed_with(claims(), keys["a"].public_pem, kid="key-a"),
        "another key with a known kid": keys["stranger"].sign(claims()),
        "unknown kid": Key("key-never").sign(claims()),
        "alg none": jwt.encode(claims(), None, algorithm="none", headers={"kid": "key-a"}),
        "wrong issuer": keys["a"].sign(claims(iss="https://evil.example")),
        "expired": keys["a"].sign(claims(exp=int(time.time()) - 120)),
    }
    for name, token in tokens.items():
        res = await session_of(jwks_server, token)
        assert res.status_code == 401, name
        assert error_code(res) == ("token_expired" if name == "expired" else "unauthorized"), name
        socket, frame = await ws_auth(jwks_server, token)
        assert frame["data"]["code"] == error_code(res), name
        assert await closed_code(socket) == 4401


async def test_a_rotated_jwks_is_fetched_for_a_new_kid_at_most_once_per_interval_and_cached_keys_outlive_it(
        tmp_path, keys):
    jwks = JwksServer([keys["a"]])
    server = RelayServer(tmp_path, {"RELAY_JWKS_URL": jwks.url, "RELAY_JWKS_REFETCH_SECONDS": "1",
                                    "RELAY_AUTH_CACHE_SECONDS": "0"})
    try:
        assert (await session_of(server, keys["a"].sign(claims("sub-a")))).status_code == 200
        fetched = jwks.requests
        # Unknown kids in a burst: one fetch at most, however many tokens carry them.
        burst = [await session_of(server, Key(f"key-unknown-{n}").sign(claims())) for n in range(5)]
        assert all(res.status_code == 401 for res in burst)
        assert jwks.requests - fetched <= 1
        jwks.keys = [keys["a"], keys["b"]]  # the app rotates: b is the new key, a is still listed
        token_b = keys["b"].sign(claims("sub-b"))
        async with asyncio.timeout(10):
            while (res := await session_of(server, token_b)).status_code != 200:
                assert error_code(res) == "unauthorized"
                await asyncio.sleep(0.2)
        jwks.stop()  # the JWKS goes down: the keys already fetched keep working
        for key in ("a", "b"):
            assert (await session_of(server, keys[key].sign(claims(f"sub-{key}")))).status_code == 200
        await asyncio.sleep(1.1)  # past RELAY_JWKS_REFETCH_SECONDS: the unknown kid makes a fetch, which fails
        key_c = Key("key-c")
        assert (await session_of(server, key_c.sign(claims()))).status_code == 401
        for key in ("a", "b"):
            assert (await session_of(server, keys[key].sign(claims(f"sub-{key}")))).status_code == 200
        # The JWKS comes back rotated once more: a is gone, c is new. c's first token fetches it; a's kid is then
        # unknown, and refused.
        jwks = JwksServer([keys["b"], key_c], port=int(jwks.url.split(":")[2].split("/")[0]))
        await asyncio.sleep(1.1)
        assert (await session_of(server, key_c.sign(claims("sub-c")))).status_code == 200
        res = await session_of(server, keys["a"].sign(claims("sub-a")))
        assert res.status_code == 401 and error_code(res) == "unauthorized"
        assert (await session_of(server, keys["b"].sign(claims("sub-b")))).status_code == 200
    finally:
        server.stop()
        jwks.stop()
    assert_no_traceback(server)
    assert "could not read the JWKS" in server.log()
    assert_no_secret_in_log(server)


async def test_a_jwks_unreachable_at_start_is_a_warning_and_is_asked_again_on_demand(tmp_path, keys):
    port = free_port()
    url = f"http://127.0.0.1:{port}/jwks.json"
    server = RelayServer(tmp_path, {"RELAY_JWKS_URL": url, "RELAY_JWKS_REFETCH_SECONDS": "0.5"})
    jwks = None
    try:
        assert "gave no usable keys at start" in server.log()
        token = keys["a"].sign(claims("sub-late"))
        assert (await session_of(server, token)).status_code == 401
        jwks = JwksServer([keys["a"]], port=port)
        async with asyncio.timeout(10):
            while (await session_of(server, token)).status_code != 200:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.2)
    finally:
        server.stop()
        if jwks is not None:
            jwks.stop()
    assert_no_traceback(server)


# --- The trusted proxy header ---------------------------------------------------------------------------------


async def test_a_trusted_proxys_header_names_the_user_and_from_anyone_else_it_is_ignored(tmp_path):
    (tmp_path / "trusted").mkdir()
    (tmp_path / "untrusted").mkdir()
    trusted = RelayServer(tmp_path / "trusted", {
        "RELAY_TRUSTED_USER_HEADER": "X-Forwarded-User", "RELAY_TRUSTED_PROXIES": "127.0.0.1/32",
        "RELAY_TRUSTED_ADMIN_HEADER": "X-Forwarded-Admin"})
    untrusted = RelayServer(tmp_path / "untrusted", {
        "RELAY_TRUSTED_USER_HEADER": "X-Forwarded-User", "RELAY_TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8"})
    try:
        async with httpx.AsyncClient(base_url=trusted.url, timeout=30) as client:
            res = await client.get("/api/session", headers={"X-Forwarded-User": "pat@corp"})
            assert res.json()["user"] == {"name": "pat@corp", "admin": False, "anonymous": False}
            res = await client.get("/api/session",
                                   headers={"X-Forwarded-User": "pat@corp", "X-Forwarded-Admin": "true"})
            assert res.json()["user"]["admin"] is True
            events = await sse_stream(trusted.url, {"message": "via the proxy"},
                                      headers={"X-Forwarded-User": "pat@corp"})
            assert names(events)[-1] == "done"
            # Uvicorn trusts X-Forwarded-For from 127.0.0.1 (--forwarded-allow-ips): the address compared is then the
            # forwarded one, which is not a trusted proxy.
            res = await client.get("/api/session", headers={"X-Forwarded-User": "pat@corp",
                                                            "X-Forwarded-For": "203.0.113.9"})
            assert res.status_code == 401
        async with websockets.connect(trusted.ws_url + WS_PATH, additional_headers={"X-Forwarded-User": "pat@corp"}) \
                as socket:
            await socket.send('{"type": "ping"}')
            assert json.loads(await asyncio.wait_for(socket.recv(), 10)) == {"event": "pong"}
        assert trusted.rows("SELECT issuer, subject, name FROM users") == [
            ("proxy:x-forwarded-user", "pat@corp", "pat@corp")]
        async with httpx.AsyncClient(base_url=untrusted.url, timeout=30) as client:
            for _ in range(3):
                res = await client.get("/api/conversations", headers={"X-Forwarded-User": "pat@corp"})
                assert res.status_code == 401 and error_code(res) == "unauthorized"
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(untrusted.ws_url + WS_PATH, additional_headers={"X-Forwarded-User": "pat"}):
                pass
        assert refused.value.response.status_code == 401
        assert untrusted.log().count("ignored x-forwarded-user from 127.0.0.1") == 1
        assert untrusted.rows("SELECT COUNT(*) FROM users") == [(0,)]
    finally:
        trusted.stop()
        untrusted.stop()
    assert_no_traceback(trusted)
    assert_no_traceback(untrusted)


def test_the_log_check_catches_a_jwt(tmp_path):
    """The check every server fixture here ends with would see a token that reached a log."""
    assert JWT_SHAPE.search("refused " + hs(claims())) is not None
    assert JWT_SHAPE.search("JWT refused: Signature verification failed") is None


def test_a_server_without_jwt_settings_never_loads_pyjwt(tmp_path):
    """PyJWT loads cryptography's backends (about 9 MB of RSS): the module, the app and a request with a token
    that looks like a JWT do without it until a JWT setting exists. Fails when server/identity.py imports jwt
    at its top."""
    probe = (
        "import asyncio, sys, httpx\n"
        "from server.app import create_app\n"
        "from server.config import load_settings\n"
        "async def main():\n"
        f"    app = create_app(load_settings(database_url='sqlite:///{tmp_path / 'r.db'}'))\n"
        "    async with app.router.lifespan_context(app):\n"
        "        transport = httpx.ASGITransport(app=app)\n"
        "        async with httpx.AsyncClient(transport=transport, base_url='http://localhost') as client:\n"
        "            response = await client.get('/api/conversations', headers={'authorization': 'Bearer a.b.c'})\n"
        "    print(response.status_code, 'jwt' in sys.modules)\n"
        "asyncio.run(main())\n")
    out = subprocess.run([SERVER_PYTHON, "-c", probe], cwd=SERVER_CWD, env=_clean_env({}), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["401", "False"]
