"""Pure loss and target functions, one per paper equation (see each docstring for the source)."""
