"""Route handlers, one module per resource; each handler parses, calls the engine, and maps the result."""
