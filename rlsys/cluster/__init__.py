"""The Ray edge: placement groups, actors and the group handles the loops call."""
