"""What nodes of a cluster share: rules, views and throttles through Redis
(``[cluster] redis_url``), and mail, moved by xfer over the nodes' HTTP APIs."""
