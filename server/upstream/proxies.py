"""Which proxy, if any, an upstream URL goes through: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY.

Pure: no I/O. The variables mean what they mean to httpx's `trust_env` (which reads them through urllib's
rules): each name in lowercase or uppercase, the lowercase one winning (an empty lowercase one unsets it);
uppercase HTTP_PROXY ignored when REQUEST_METHOD is set (a CGI request could have set it: CVE-2016-1000110);
a proxy URL without a scheme is http://. HTTPS_PROXY serves https:// URLs, HTTP_PROXY http:// ones,
ALL_PROXY either when its own is unset. NO_PROXY is a comma-separated list whose entries are matched as
httpx matches them:

    *                 no URL goes through a proxy
    example.com       example.com and its subdomains (not wwwexample.com)
    .example.com      its subdomains only
    localhost         that name only
    10.1.2.3, ::1     that address; with a prefix (10.0.0.0/8, fd00::/8) every address in the network
    host:8080         that host on that port only
    https://host      URLs of that scheme (and host, and port if given)

As with httpx, loopback hosts are not special: `localhost` or `127.0.0.1` goes through the proxy unless
NO_PROXY names it. CIDR prefixes are matched as networks (httpx compares the address part only).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

# Proxy schemes the upstream clients speak to a proxy (TLS to the proxy itself for https://).
PROXY_SCHEMES = ("http", "https")


class ProxyConfigError(ValueError):
    """A proxy variable holds something that is not a usable proxy URL; the message names it, masked."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: where it is, and the user and password its URL carried (sent as Proxy-Authorization)."""

    url: httpx.URL  # without credentials
    auth: tuple[str, str] | None = field(default=None, repr=False)
    authorization: bytes | None = field(default=None, repr=False, compare=False)  # b"Basic ..." from auth

    @classmethod
    def parse(cls, value: str, name: str = "proxy") -> Proxy:
        """The proxy a variable's value names.

        Raises:
            ProxyConfigError: not an http:// or https:// URL with a host; the message never shows a password.
        """
        text = value.strip()
        if "://" not in text:
            text = "http://" + text
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL:
            raise ProxyConfigError(f"{name} is not a valid URL: {mask(text)}") from None
        if url.scheme not in PROXY_SCHEMES or not url.host:
            raise ProxyConfigError(f"{name} must be an http:// or https:// proxy URL such as http://proxy:3128,"
                                   f" got {mask(text)}")
        bare = url.copy_with(username=None, password=None, path="/", query=None, fragment=None)
        if not (url.username or url.password):
            return cls(bare)
        auth = (url.username, url.password)
        return cls(bare, auth, b"Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()))

    @property
    def host(self) -> str:
        return self.url.host

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)

    def httpx_proxy(self) -> httpx.Proxy:
        """The same proxy for httpx's and httpx-aiohttp's transports.

        The credentials go as a ready Proxy-Authorization header: httpx.Proxy(auth=...) makes httpx-aiohttp
        build an aiohttp.BasicAuth, deprecated since aiohttp 3.14 (aio-libs/aiohttp#12499).
        """
        if self.authorization is None:
            return httpx.Proxy(self.url)
        return httpx.Proxy(self.url, headers={"proxy-authorization": self.authorization.decode("ascii")})

    def __str__(self) -> str:
        """The proxy as logs and error messages show it: credentials masked."""
        return f"{self.url.scheme}://{'***@' if self.auth else ''}{self.url.netloc.decode('ascii')}"


def mask(url: str) -> str:
    """`url` with anything between `://` and `@` (user and password) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}://***@{host}" if at and "/" not in userinfo else url


@dataclass(frozen=True, slots=True)
class _Bypass:
    """One NO_PROXY entry."""

    scheme: str = ""  # "" for any
    host: str = ""  # exact name, or the domain of `subdomains`
    subdomains: str = ""  # "only" (.example.com) or "also" (example.com) or "" (exact)
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme and self.scheme != scheme:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        if not self.host:
            return True
        if self.subdomains == "only":
            return host.endswith("." + self.host)
        if self.subdomains == "also":
            return host == self.host or host.endswith("." + self.host)
        return host == self.host


def _bypass(entry: str) -> _Bypass | None:
    """A NO_PROXY entry as a rule; None for one that names nothing."""
    scheme = ""
    if "://" in entry:
        scheme, _, entry = entry.partition("://")
        scheme = "" if scheme.lower() == "all" else scheme.lower()
    entry = entry.lower().rstrip("/")
    network = _network(entry)
    if network is not None:
        return _Bypass(scheme, network=network)
    port = None
    head, colon, tail = entry.rpartition(":")
    if colon and tail.isdigit():
        entry, port = head, int(tail)
        network = _network(entry)
        if network is not None:
            return _Bypass(scheme, network=network, port=port)
    if entry.startswith(("*.", ".")):
        return _Bypass(scheme, entry.lstrip("*."), "only", port=port)
    if entry == "localhost":
        return _Bypass(scheme, entry, port=port)
    entry = entry.lstrip("*")
    if not entry and not scheme:
        return None
    return _Bypass(scheme, entry, "also", port=port)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ProxyEnvironment:
    """The proxy variables of one environment, parsed once; `proxy_for(url)` applies them.

    A variable that is not a usable proxy URL is an error only for the URLs it would serve (`proxy_for`
    raises), so an ALL_PROXY=socks5://... meant for other programs does not matter to https:// URLs while
    HTTPS_PROXY is set.
    """

    http: Proxy | ProxyConfigError | None = None
    https: Proxy | ProxyConfigError | None = None
    all: Proxy | ProxyConfigError | None = None
    no_proxy: tuple[_Bypass, ...] = field(default=(), repr=False)
    bypass_all: bool = False  # NO_PROXY contains *

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyEnvironment:
        """The proxies `environ` names (an empty environment: none)."""
        values = proxy_variables(environ)
        proxies: dict[str, Proxy | ProxyConfigError | None] = {}
        for scheme in ("http", "https", "all"):
            value = values.get(scheme)
            try:
                proxies[scheme] = Proxy.parse(value, f"{scheme.upper()}_PROXY") if value else None
            except ProxyConfigError as exc:
                proxies[scheme] = exc
        entries = [entry.strip() for entry in values.get("no", "").split(",")]
        rules = tuple(rule for rule in map(_bypass, filter(None, entries)) if rule is not None)
        return cls(proxies["http"], proxies["https"], proxies["all"], rules, "*" in entries)

    def proxy_for(self, url: httpx.URL) -> Proxy | None:
        """The proxy a request to `url` goes through, or None to connect directly.

        Raises:
            ProxyConfigError: the variable that serves `url` is not an http:// or https:// proxy URL.
        """
        if self.bypass_all:
            return None
        scheme = url.scheme
        proxy = (self.https if scheme == "https" else self.http if scheme == "http" else None) or self.all
        if proxy is None:
            return None
        host = url.host.lower()
        port = url.port or (443 if scheme == "https" else 80)
        if any(rule.matches(scheme, host, port) for rule in self.no_proxy):
            return None
        if isinstance(proxy, ProxyConfigError):
            raise ProxyConfigError(str(proxy))
        return proxy


def proxy_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """`{"http": ..., "https": ..., "no": ...}` from the *_proxy variables, by urllib's rules
    (urllib.request.getproxies_environment, which reads os.environ only)."""
    found: list[tuple[str, str, str]] = []
    values: dict[str, str] = {}
    for name, value in environ.items():
        if len(name) > 6 and name[-6] == "_" and name[-5:].lower() == "proxy":
            kind = name[:-6].lower()
            found.append((name, value, kind))
            if value:
                values[kind] = value
    if "REQUEST_METHOD" in environ:
        values.pop("http", None)  # a CGI request's Proxy header arrives as HTTP_PROXY
    for name, value, kind in found:  # the lowercase names win, and an empty one unsets
        if name[-6:] == "_proxy":
            if value:
                values[kind] = value
            else:
                values.pop(kind, None)
    return values
