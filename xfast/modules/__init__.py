"""nn.Module wrappers of the functional losses, one per file."""
