"""The control plane: organisations, keys, pricing, metering, limits, invoices, audit. Imports neither torch nor FastAPI."""
