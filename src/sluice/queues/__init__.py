"""Scheduled queues (retry, expiry) and ready queues (per-site dispatch)."""
