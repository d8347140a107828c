"""Where leases live: one interface (base.Store), one module per store."""
