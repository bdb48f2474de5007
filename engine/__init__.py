"""sdflow engine: a generic typed node-graph engine (no diffusion, no HTTP)."""
