"""The page and the JS client as the server finds them: package data, through importlib.resources.

static/ and client/ live at the top of the repository and are installed as the packages `server._static` and
`server._client` (pyproject.toml maps them), so a wheel and an editable checkout are found the same way. No I/O
but reading those folders' listings; no request handling but refusing names that are not assets.
"""

from __future__ import annotations

import functools
import logging
from importlib.resources import files
from pathlib import Path, PurePosixPath

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

log = logging.getLogger("deltarelay")

STATIC_PACKAGE = "server._static"
CLIENT_PACKAGE = "server._client"
# What the page is made of; the package's own __init__.py and its bytecode are not assets.
STATIC_SUFFIXES = frozenset({".html", ".js", ".css", ".svg"})
CLIENT_SOURCE = "deltarelay.js"
CLIENT_BUILD = ("deltarelay.js", "deltarelay.js.map")  # in dist/: esbuild's minified module and its source map


def package_dir(package: str) -> Path:
    """The folder holding `package`'s files.

    Raises:
        RuntimeError: the package is not installed as plain files (a zip), which StaticFiles cannot serve.
    """
    root = files(package)
    if not isinstance(root, Path):
        raise RuntimeError(f"{package} is not installed as files ({root!r}): install deltarelay unzipped")
    return root


class AssetFiles(StaticFiles):
    """StaticFiles that serves only the files it is told are assets, by name or by suffix, and 404s the rest."""

    def __init__(self, directory: Path, *, names: frozenset[str] = frozenset(),
                 suffixes: frozenset[str] = frozenset()) -> None:
        super().__init__(directory=directory)
        self.names = names
        self.suffixes = suffixes

    async def get_response(self, path: str, scope: Scope) -> Response:
        name = PurePosixPath(path)
        if str(name) not in self.names and name.suffix not in self.suffixes:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)


@functools.cache
def static_dir() -> Path:
    """The demo page's folder (index.html, app.js, style.css...)."""
    return package_dir(STATIC_PACKAGE)


def static_files() -> AssetFiles:
    """/static: the page's HTML, scripts, styles and icons."""
    return AssetFiles(static_dir(), suffixes=STATIC_SUFFIXES)


def client_files(root: Path | None = None) -> AssetFiles:
    """/client: the minified build and its source map, or the readable source when there is no current build.

    A wheel carries only the build. In an editable checkout the build is used unless it is missing (npm was not
    there at install) or older than the source beside it (the source was edited since), so what is served is
    always the code as it stands. `root` is the client's folder (default: the installed package's).
    """
    root = root or package_dir(CLIENT_PACKAGE)
    dist = root / "dist"
    build = dist / CLIENT_BUILD[0]
    source = root / CLIENT_SOURCE
    if build.is_file() and not (source.is_file() and source.stat().st_mtime > build.stat().st_mtime):
        return AssetFiles(dist, names=frozenset(CLIENT_BUILD))
    if build.is_file():
        log.warning("the JS client's build is older than its source: serving the source (`npm run build` in"
                    " client/ builds it again)")
    return AssetFiles(root, names=frozenset({CLIENT_SOURCE}))
