"""How the world TALKS to the engine: the FastAPI app, its schemas, error mapping, metrics and settings."""
