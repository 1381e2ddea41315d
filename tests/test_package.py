"""What a user installs: the sdist and wheel `python -m build` makes, installed in a fresh venv outside the checkout.

One build, one venv and one server for the module; the server runs from a temp folder with the venv's python, so
nothing of the checkout is on its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from setuptools.errors import SetupError

import build_client
from server import assets

from .conftest import ROOT, SERVER_PYTHON, Process, _clean_env, assert_no_traceback, free_port
from .relay_clients import demo_answer, names, sse_stream, text_of

CLIENT = ROOT / "client"


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a build step; its output is shown only when it fails."""
    done = subprocess.run([str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel built from it, as CI builds them (scripts/test's own build, when it made one)."""
    if os.environ.get("DELTARELAY_DIST"):
        out = Path(os.environ["DELTARELAY_DIST"])
    else:
        out = tmp_path_factory.mktemp("dist")
        run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    return {"sdist": next(out.glob("*.tar.gz")), "wheel": next(out.glob("*.whl"))}


@pytest.fixture(scope="module")
def installed(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel installed: its python (scripts/test's, when it made one)."""
    if SERVER_PYTHON != sys.executable:
        return Path(SERVER_PYTHON)
    venv = tmp_path_factory.mktemp("venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run(sys.executable, "-m", "venv", venv, env=env)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", built["wheel"], env=env)
    return python


@pytest.fixture(scope="module")
def server(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """`python -m server` of the installed wheel, started in an empty temp folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    env = {k: v for k, v in _clean_env({"DATABASE_URL": f"sqlite:///{cwd / 'relay.db'}"}).items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    port = free_port()
    process = Process([str(installed), "-m", "server", "--port", str(port)], env, cwd / "server.log", port,
                      "/healthz", cwd=cwd)
    yield process
    process.stop()
    assert_no_traceback(process)


def test_pyproject_and_package_json_have_one_version():
    """The npm package and the Python package are released together: changing either version alone fails this."""
    python_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    package = json.loads((CLIENT / "package.json").read_text())
    lock = json.loads((CLIENT / "package-lock.json").read_text())
    assert package["version"] == lock["version"] == lock["packages"][""]["version"] == python_version


def test_a_checkout_serves_the_client_build_unless_the_source_is_newer(tmp_path):
    """An editable install must not serve a build older than the source (an edit since `npm run build`).
    Mutation: dropping the mtime comparison in assets.client_files serves the stale build here."""
    (tmp_path / "dist").mkdir()
    source, build = tmp_path / "deltarelay.js", tmp_path / "dist" / "deltarelay.js"
    source.write_text("export const a = 1\n")
    assert assets.client_files(tmp_path).directory == tmp_path  # no build: the source
    build.write_text("export const a=1;\n")
    os.utime(source, (1_000, 1_000))
    os.utime(build, (2_000, 2_000))
    served = assets.client_files(tmp_path)
    assert served.directory == tmp_path / "dist" and served.names == {"deltarelay.js", "deltarelay.js.map"}
    os.utime(source, (3_000, 3_000))
    served = assets.client_files(tmp_path)
    assert served.directory == tmp_path and served.names == {"deltarelay.js"}


def test_the_build_hook_rebuilds_only_a_missing_or_older_client_build(tmp_path, monkeypatch):
    """Mutation: `<` for `>` (or no mtime check) in build_client.stale makes a package with a stale build."""
    monkeypatch.setattr(build_client, "CLIENT", tmp_path)
    (tmp_path / "dist").mkdir()
    for name in build_client.SOURCES:
        (tmp_path / name).write_text("{}")
        os.utime(tmp_path / name, (1_000, 1_000))
    assert build_client.stale()  # no build
    for name in build_client.BUILT:
        (tmp_path / name).write_text("built")
        os.utime(tmp_path / name, (2_000, 2_000))
    assert not build_client.stale()
    os.utime(tmp_path / "package-lock.json", (3_000, 3_000))  # e.g. esbuild upgraded
    assert build_client.stale()


def test_without_npm_a_package_needs_a_build_and_an_editable_install_goes_on(tmp_path, monkeypatch, capsys):
    """No npm and no client/dist: building a wheel or an sdist stops with one line; an editable install warns."""
    monkeypatch.setattr(build_client, "CLIENT", tmp_path)
    monkeypatch.setattr(build_client.shutil, "which", lambda name: None)
    (tmp_path / "deltarelay.js").write_text("export {}")
    with pytest.raises(SetupError, match=r"^building deltarelay needs npm \(Node.js\)"):
        build_client.build_client(required=True)
    build_client.build_client(required=False)
    assert "npm not found" in capsys.readouterr().err


def test_the_installed_server_imports_from_the_venv_not_the_checkout(installed, tmp_path):
    done = subprocess.run([installed, "-c", "import server, server.assets as a; print(server.__file__);"
                           " print(a.static_dir()); print(a.client_files().directory)"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    venv = installed.parent.parent
    for line in done.stdout.split():
        assert Path(line).is_relative_to(venv), done.stdout


def test_the_installed_wheel_serves_the_page_and_its_script(server):
    """Before the fix the page was looked up beside the checkout: from a wheel GET / was a 500
    ("static/index.html does not exist"). Reverting server/assets.py's importlib.resources lookup fails this."""
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (ROOT / "static" / "index.html").read_text()
    script = httpx.get(server.url + "/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.content == (ROOT / "static" / "app.js").read_bytes()
    assert httpx.get(server.url + "/favicon.ico").status_code == 200
    assert httpx.get(server.url + "/usage").status_code == 200


def test_the_installed_wheel_serves_the_markdown_renderer_and_its_vendored_libraries(server, built):
    """The page imports static/markdown.js, which imports the vendored marked and DOMPurify: without them in
    pyproject.toml's package data an installed page renders no answer. Their licence texts ship beside them."""
    for name in ("markdown.js", "vendor/marked.esm.js", "vendor/purify.es.js"):
        res = httpx.get(f"{server.url}/static/{name}")
        assert res.status_code == 200 and "javascript" in res.headers["content-type"], name
        assert res.content == (ROOT / "static" / name).read_bytes(), name
    with zipfile.ZipFile(built["wheel"]) as wheel:
        files = set(wheel.namelist())
    assert {"server/_static/vendor/LICENSE-marked", "server/_static/vendor/LICENSE-dompurify",
            "server/_static/vendor/LICENSE-dompurify-MPL"} <= files
    assert httpx.get(server.url + "/static/vendor/LICENSE-marked").status_code == 404  # shipped, not an asset


def test_the_installed_wheel_serves_the_minified_client_and_its_source_map(server, built):
    """GET /client/deltarelay.js is esbuild's build with a source map that resolves; was a 500 from a wheel, and the
    readable source from a checkout. Fails if the wheel leaves client/dist out or the server serves the source."""
    res = httpx.get(server.url + "/client/deltarelay.js")
    assert res.status_code == 200 and "javascript" in res.headers["content-type"]
    source = (CLIENT / "deltarelay.js").read_text()
    with zipfile.ZipFile(built["wheel"]) as wheel:
        assert res.content == wheel.read("server/_client/dist/deltarelay.js")
    body = res.text
    assert len(body) < len(source) / 2 and "export{" in body and "// deltarelay client" not in body, "not minified"
    last = body.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("//# sourceMappingURL="), last
    map_url = urljoin(str(res.url), last.removeprefix("//# sourceMappingURL="))
    source_map = httpx.get(map_url)
    assert source_map.status_code == 200, map_url
    mapping = source_map.json()
    assert mapping["version"] == 3 and mapping["mappings"]
    assert mapping["sourcesContent"] == [source]  # the readable source, as in the repo


async def test_the_installed_wheel_streams_an_answer_over_sse(server):
    events = await sse_stream(server.url, {"message": "Hello"})
    assert names(events)[0] == "start" and names(events)[-1] == "done"
    assert text_of(events) == demo_answer("Hello")


def test_the_package_files_that_are_not_assets_are_not_served(server):
    """Mutation: AssetFiles.get_response without its name/suffix check serves the packages' __init__.py."""
    for path in ("/static/__init__.py", "/client/__init__.py", "/client/package.json", "/client/deltarelay.d.ts"):
        assert httpx.get(server.url + path).status_code == 404, path


def test_the_wheel_carries_only_what_the_server_needs(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        files = set(wheel.namelist())
    assert {"server/_static/index.html", "server/_static/app.js", "server/_client/dist/deltarelay.js",
            "server/_client/dist/deltarelay.js.map", "server/store/__init__.py", "server/store/migrations/env.py",
            "server/store/migrations/versions/v0001_initial.py"} <= files  # a start migrates with them
    assert not {name for name in files if name.split("/")[0] in ("static", "client", "tests")}  # no top-level ones
    assert not {name for name in files if "/test" in name or "node_modules" in name or name.endswith(".d.ts")}


def test_the_sdist_carries_the_page_the_client_build_and_no_tests(built):
    """Installing from the sdist needs no Node.js: it has client/dist. Fails without MANIFEST.in's `prune tests`."""
    with tarfile.open(built["sdist"]) as sdist:
        files = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"static/index.html", "static/app.js", "static/vendor/marked.esm.js", "static/vendor/purify.es.js",
            "static/vendor/LICENSE-marked", "client/deltarelay.js", "client/deltarelay.d.ts",
            "client/package.json", "client/package-lock.json", "client/dist/deltarelay.js",
            "client/dist/deltarelay.js.map", "build_client.py"} <= files
    assert not {name for name in files if name.startswith(("tests/", "client/test/")) or "node_modules" in name}

