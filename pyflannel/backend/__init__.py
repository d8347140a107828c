"""How packets cross nodes: one interface (base.Backend), one module per backend, a registry by Type."""
