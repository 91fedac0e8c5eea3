"""Outbound delivery: next-hop resolution and the SMTP client."""
