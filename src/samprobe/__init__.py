"""samprobe: frozen SAM encoder features -> trained, evaluated image classifier."""

__version__ = "0.1.0"
