"""Stand-in ``__init__`` for an engine package whose own one pulls in its serving stack."""
