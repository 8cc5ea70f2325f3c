"""The run spec: its schema (pydantic, every section rejects unknown keys), YAML loading with line
numbers and command-line overrides, and the optimizer and schedule names it accepts. Pure: anywhere,
no torch."""
