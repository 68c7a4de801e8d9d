"""`tokenforge bench`: a serving benchmark of any OpenAI-compatible endpoint, or of the engine in
process. See tokenforge/bench/README.md."""
