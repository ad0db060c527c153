"""CLI commands, one module per stage. Each defines ``register(app)`` and imports heavy code lazily."""
