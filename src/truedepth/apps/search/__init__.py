"""Search for the layer groups that cost least at a target depth."""
