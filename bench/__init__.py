"""The rotation benchmark behind `make bench`: scenarios, a local stack, and the report."""
