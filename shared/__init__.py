"""What producers and workers share: the event schema, Redis keys and settings."""
