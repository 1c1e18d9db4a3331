"""Running the server: launching tritonserver with the Python backend (launcher), `lookalike serve` and its
supervisor (health endpoints, restarting dead model stubs), and a local Milvus standalone for development."""
