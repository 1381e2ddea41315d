"""The demo page's files, installed as the package `server._static` (pyproject.toml maps this folder to it).

This file makes the folder a regular package: setuptools' editable installs cannot import a namespace package that
package-dir maps to another folder (https://github.com/pypa/setuptools/issues/4248).
"""
