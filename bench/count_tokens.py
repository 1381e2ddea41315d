"""The cost of one token count (POST /v1/messages/count_tokens) as the relay asks it, against the local emulation.

    python -m bench.count_tokens [--requests 200] [--tokens 190000]

Starts `python -m server.mock_upstream` on a free loopback port and times AnthropicUpstream.count_tokens for a
small request and for one of about --tokens emulated tokens (the size at which the relay asks: within 10% of a
200K window). Never the real API: what this measures is the relay's own share (building and sending the
body, reading the answer) plus a loopback round trip; the real endpoint adds its network round trip and
its own processing on top, which only a run with a real key could tell.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

from server.config import load_settings
from server.upstream.anthropic import AnthropicUpstream, UpstreamRequest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_until_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the mock upstream did not start")


async def _time(upstream: AnthropicUpstream, request: UpstreamRequest, times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        tokens = await upstream.count_tokens(request)
        samples.append((time.perf_counter() - started) * 1000)
        assert tokens is not None
    return samples


async def _measure(port: int, args: argparse.Namespace) -> None:
    await _wait_until_listening(port)
    settings = load_settings({}, anthropic_api_key="sk-local-emulation",
                             anthropic_base_url=f"http://127.0.0.1:{port}")
    upstream = AnthropicUpstream(settings)
    small = UpstreamRequest("claude-sonnet-4-5", 1024, [{"role": "user", "content": "Hello"}])
    turns = 40
    size = args.tokens * 4 // turns  # bytes a message, by the emulated rule (4 bytes a token)
    big = UpstreamRequest("claude-sonnet-4-5", 1024, [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "w" * size} for i in range(turns - 1)])
    await _time(upstream, small, 10)  # warm the connection pool and the server
    for name, request in (("small", small), (f"{args.tokens} tokens", big)):
        samples = sorted(await _time(upstream, request, args.requests))
        print(f"{name}: median {statistics.median(samples):.2f} ms, p95 {samples[int(len(samples) * .95)]:.2f} ms"
              f" over {len(samples)} counts")
    await upstream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.count_tokens", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=190_000)
    args = parser.parse_args()
    port = _free_port()
    mock = subprocess.Popen([sys.executable, "-m", "server.mock_upstream", "--port", str(port)])
    try:
        asyncio.run(_measure(port, args))
    finally:
        mock.terminate()
        mock.wait()


if __name__ == "__main__":
    main()
