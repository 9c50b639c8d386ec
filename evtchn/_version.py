"""The one place evtchn's version is written: setuptools reads it without importing the
package (pyproject.toml: dynamic version), and ``evtchn.__version__`` re-exports it."""

__version__ = "0.2.0"
