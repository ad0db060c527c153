"""CLI commands, one module per stage. Each defines ``register(app)`` and imports heavy code lazily."""

DB_HELP = "History database (default: the one `genrec-edge init` builds under GENREC_EDGE_HOME)."
