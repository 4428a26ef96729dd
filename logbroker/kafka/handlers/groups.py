"""Consumer groups on the Kafka port (filled in step 2)."""
