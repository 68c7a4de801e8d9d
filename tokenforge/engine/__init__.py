"""Request state and scheduling: no CUDA, no HTTP."""
