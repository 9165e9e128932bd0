"""The second peer: Quix Streams with its PostgreSQL sink, the library a Python team would
pick. `app` is the application (run in a virtualenv of its own, made by `venv`), `phase`
feeds, times and checks it in the benchmark."""
