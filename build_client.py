"""Packaging only: setuptools commands that build the JS client (npm ci && npm run build in client/) first.

Why a setuptools hook: the wheel and the sdist must carry client/dist (esbuild's minified module and its source map),
which is built, not committed, so the build runs whenever setuptools packages and the build is missing or older than
its source; an sdist carries it, so installing from one needs no Node.js. pyproject.toml's [tool.setuptools.cmdclass]
names these commands. Not part of the installed package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.errors import SetupError

CLIENT = Path(__file__).resolve().parent / "client"
SOURCES = ("deltarelay.js", "package.json", "package-lock.json")
BUILT = ("dist/deltarelay.js", "dist/deltarelay.js.map")


def stale() -> bool:
    """Whether client/dist is missing or older than any file it is made from."""
    built = [CLIENT / name for name in BUILT]
    if not all(path.is_file() for path in built):
        return True
    newest_source = max((CLIENT / name).stat().st_mtime for name in SOURCES if (CLIENT / name).is_file())
    return min(path.stat().st_mtime for path in built) < newest_source


def build_client(*, required: bool) -> None:
    """Build client/dist with npm when it is stale.

    Without npm, an existing build is used as it is (with a warning when it is older than the source); with no
    build at all, a package cannot be made (`required`) or an editable install goes on and the server serves the
    readable source.

    Raises:
        SetupError: `required`, no npm, and no build.
    """
    if not stale():
        return
    npm = shutil.which("npm")
    if npm is None:
        exists = all((CLIENT / name).is_file() for name in BUILT)
        if exists or not required:
            what = "using the older build" if exists else "the server will serve client/deltarelay.js as written"
            print(f"warning: npm not found, client/dist not rebuilt: {what}", file=sys.stderr)
            return
        raise SetupError("building deltarelay needs npm (Node.js) to make client/dist, the minified JS client;"
                         " install Node.js, or build from an sdist, which carries client/dist")
    for args in (["ci", "--no-audit", "--no-fund", "--loglevel=error"], ["run", "build", "--silent"]):
        subprocess.run([npm, *args], cwd=CLIENT, check=True)


class BuildPy(build_py):
    """build_py that builds the JS client first (optional for an editable install)."""

    def run(self) -> None:
        build_client(required=not self.editable_mode)
        super().run()


class Sdist(sdist):
    """sdist that builds the JS client first, so the sdist carries client/dist."""

    def run(self) -> None:
        build_client(required=True)
        super().run()
