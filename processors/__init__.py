"""Atlas's own frame processors and observers, between the services in the one pipeline."""
