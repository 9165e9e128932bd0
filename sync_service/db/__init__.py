"""PostgreSQL: the engine, the schema's models, and the statements the pipeline runs."""
