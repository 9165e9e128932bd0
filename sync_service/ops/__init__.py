"""What operators run: positions and lag, replays, dead letters, the demo."""
