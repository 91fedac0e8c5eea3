"""What nodes of a cluster share through Redis (``[cluster] redis_url``)."""
