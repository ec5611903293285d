"""Everything about the adapter artefact: PEFT format, validation, store, registry."""
