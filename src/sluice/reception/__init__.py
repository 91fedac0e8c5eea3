"""Mail in: SMTP (aiosmtpd) and HTTP injection, both through ``Intake``."""
