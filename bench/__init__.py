"""The benchmark: sync_service beside its baselines, its peer and the machine's limit.

Every figure comes from one run on one machine, checked against the expected final state.
"""
