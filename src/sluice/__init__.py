"""Sluice: a mail transfer agent for bulk senders, built around operator control."""

__version__ = "0.1.0"
