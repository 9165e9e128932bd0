"""The contracts as types: inbound change envelopes and outbound events."""
