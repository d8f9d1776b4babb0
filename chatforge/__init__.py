"""chatforge: train your own chat model as a declarative DVC pipeline (docs/design.md is the map)."""
