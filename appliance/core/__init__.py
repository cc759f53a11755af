"""The pure core: protocol parsing, validation, routing decisions and rate limits. No I/O."""
