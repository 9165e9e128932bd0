"""What operators run: positions and lag, replays and dry runs, re-sends downstream, dead
letters, the audit trail, the demo."""
