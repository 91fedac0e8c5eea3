"""Operator rules: bounce (cancel) and suspend (hold), matched by queue."""
