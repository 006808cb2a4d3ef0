"""precip-cvae: NetCDF climate data -> conditional VAE -> synthetic heavy-rainfall fields."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("precip-cvae")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
