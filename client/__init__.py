"""The JS client, installed as the package `server._client` (pyproject.toml maps this folder to it).

This file makes the folder a regular package: setuptools' editable installs cannot import a namespace package that
package-dir maps to another folder (https://github.com/pypa/setuptools/issues/4248). npm's package leaves it out.
"""
