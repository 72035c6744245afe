"""Shim for tools and older pips that look for setup.py; pyproject.toml is the one source."""

from setuptools import setup

setup()
