# Metadata and configuration live in setup.cfg; this shim exists for tools
# that still call ``setup.py`` directly.
from setuptools import setup

setup()
