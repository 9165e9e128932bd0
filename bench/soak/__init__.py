"""The soak: the service at a steady rate for a long time, with faults injected, sampled as
it goes (memory, latency, lag) and checked at the end (`python -m bench.soak`)."""
