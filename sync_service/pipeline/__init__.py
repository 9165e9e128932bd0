"""consume -> decode -> batch -> plan -> write: the path of a change into PostgreSQL."""
