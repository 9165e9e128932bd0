"""How the service reaches Kafka and PostgreSQL: every client's connection options are
built here from the settings (TLS, SASL), and a refused connection is explained here."""
