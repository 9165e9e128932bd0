"""sync_service as the benchmark runs it, one job a module: the run's database
(`database`) and names (`names`), the service's processes (`process`), what the machine
spends (`usage`), watching a drain until it is done (`watch`), checking its result
(`check`), and the sync_service phase that puts them together (`phase`)."""
