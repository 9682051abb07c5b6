"""bastion: an SSH jump-host gateway."""

__version__ = "0.1.0"
