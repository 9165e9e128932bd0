"""sync_service: change events from Kafka into PostgreSQL, and a transactional outbox back out."""

__version__ = "0.1.0"
