"""Admin APIs on the Kafka port (filled in step 3)."""
