"""Redis Cluster pieces of the scale-out design (docs/scale-out.md), standalone for now."""
