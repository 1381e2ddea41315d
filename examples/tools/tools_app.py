"""An app's tools endpoint for deltarelay, in the standard library only: it checks each call's signature and
runs `get_weather`.

    RELAY_TOOLS_SECRET=change-me python examples/tools/tools_app.py [--port 8100]

deltarelay POSTs `{conversationId, messageId, user, call: {id, name, input}}` signed with
`X-Deltarelay-Signature: sha256=<hex HMAC-SHA256 of the body>`; this answers `{"content", "isError"}`.
The weather is made up (a function of the city's name), so the example runs offline.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("RELAY_TOOLS_SECRET", "")


def signed(body: bytes, header: str) -> bool:
    """Whether `header` is the signature of `body` under the shared secret (compared in constant time)."""
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header, expected)


def get_weather(city: str) -> str:
    """A made-up but stable forecast for `city`."""
    seed = sum(city.lower().encode())
    sky = ("sunny", "cloudy", "rainy", "windy")[seed % 4]
    return f"{5 + seed % 25} degrees and {sky} in {city}"


class Tools(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not signed(body, self.headers.get("X-Deltarelay-Signature", "")):
            self._answer(401, {"error": "bad signature"})
            return
        call = json.loads(body)["call"]
        if call["name"] == "get_weather" and isinstance(call["input"].get("city"), str):
            self._answer(200, {"content": get_weather(call["input"]["city"]), "isError": False})
        else:
            self._answer(200, {"content": f"no tool {call['name']} with that input", "isError": True})

    def _answer(self, status: int, payload: dict[str, object]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8100)
    port = parser.parse_args().port
    if not SECRET:
        raise SystemExit("set RELAY_TOOLS_SECRET: the secret deltarelay signs each call with")
    server = ThreadingHTTPServer(("127.0.0.1", port), Tools)
    print(f"tools on http://127.0.0.1:{server.server_address[1]}/tools", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
