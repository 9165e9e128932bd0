"""The relay: the outbox, read in commit-safe order, published to Kafka exactly once.

Its position lives only in Kafka, committed in the same transaction as the events it
covers; one replica leads, by an advisory lock and by Kafka's transactional-id fencing.
"""
