"""cpis-bridge: child protection information sharing between local authorities and unscheduled care."""

__version__ = "0.1.0"
